"""The experiment's records: what the report needs of each finished chain (one world draw, arm and
seed), one JSON file per draw, and the report's numbers made from the records alone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.experiment_design import (ARMS, GATE_ARMS, GATE_MARGIN, ORACLE_ONLY, PRIMARY, SFT_MATTERS_MARGIN,
                                         curve_steps, eval_dir)
from pipelines.experiment_stats import area_under_curve, estimate, fieller, oracle_gate, sft_matters
from pipelines.world import STYLES
from train.eval import pass_at_k, read_eval


def write_record(path: Path, rec: dict) -> None:
    """A draw's record, written whole (a temporary file, then a rename: a killed run leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def successes(folder: Path) -> tuple[list, int, list[int]]:
    """An eval folder's prompt keys ([prompt, occurrence]), samples per prompt and passing samples per
    prompt (at its own threshold): all that unbiased pass@k needs."""
    ev = read_eval(str(folder))
    keys = list(ev["rewards"])
    rewards = np.stack([ev["rewards"][key] for key in keys])  # (P, n)
    return [list(k) for k in keys], int(rewards.shape[1]), [int(c) for c in (rewards >= ev["threshold"]).sum(axis=1)]


def chain_record(d: Path, steps: list[int], sft: bool) -> dict:
    """What the report needs of one finished chain: per evaluated step the samples and passes per prompt,
    the RL reward curve, the SFT run's held-out NLL (before and after), mean weight and ESS."""
    out: dict = {"steps": {}}
    for step in steps:
        keys, n, c = successes(eval_dir(d, step, steps[-1]))
        out.setdefault("prompts", keys)
        if keys != out["prompts"]:
            raise ValueError(f"{eval_dir(d, step, steps[-1])}: other prompts than {eval_dir(d, 0, steps[-1])}")
        out["steps"][str(step)] = {"n": n, "passed": c}
    metrics = [json.loads(x) for x in (d / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out["reward_curve"] = [round(m["mean_reward"], 5) for m in metrics]
    if sft:
        t = json.loads((d / "sft" / "train_summary.json").read_text())
        out["sft"] = {k: t[k] for k in ("heldout_nll", "heldout_nll_start", "mean_weight", "mean_ess_fraction",
                                         "train_rows", "steps")}
    return out


def aligned(chain: dict, prompts: list, keys: list) -> dict:
    """A chain's passes in the order of the draw's prompts (the same prompts by construction; checked)."""
    if keys == prompts:
        return chain
    where = {tuple(k): i for i, k in enumerate(keys)}
    missing = [p for p in prompts if tuple(p) not in where]
    if missing:
        raise ValueError(f"a chain lacks {len(missing)} of the draw's prompts, e.g. {missing[0]}")
    for v in chain["steps"].values():
        v["passed"] = [v["passed"][where[tuple(p)]] for p in prompts]
    return chain


def prune(d: Path) -> None:
    """Delete a recorded chain's models (weights, checkpoints, snapshots); its logs and JSON files stay."""
    for sub in ("sft", "rl"):
        for name in ("checkpoints", "snapshots"):
            shutil.rmtree(d / sub / name, ignore_errors=True)
        for f in (d / sub).glob("*.safetensors"):
            f.unlink()


def mean_stored_weight(scores: Path, variant: str = "token") -> float:
    """Mean PEAR weight over every response token of the scored shards (streamed shard by shard)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from scorer.shards import list_shards, read_meta

    total, count = 0.0, 0
    for shard in list_shards(scores):
        if read_meta(shard).get("variant") != variant:
            raise ValueError(f"{shard} holds {read_meta(shard).get('variant')} weights; the control needs {variant}")
        flat = pc.list_flatten(pq.read_table(shard, columns=["weights"]).column("weights"))
        total += float(pc.sum(flat).as_py() or 0.0)
        count += len(flat)
    if not count:
        raise ValueError(f"no weights in {scores}")
    return total / count


def arm_weight_params(arm: str, stored: dict):
    """The PEAR weighting an arm trains with (the shards' own for the stored weights), or None."""
    from scorer.weights import WeightParams

    settings = ARMS[arm] or {}
    if settings.get("weighting") != "pear":
        return None
    params = WeightParams.from_dict(stored)
    if "variant" in settings:
        clip = settings.get("delta_clip")
        params = WeightParams(settings["variant"], params.gamma, params.block_size,
                              tuple(float(x) for x in clip.split(",")) if clip else params.delta_clip,
                              params.log_weight_clip)
    return params


def weights_by_style(scores: Path, arms: list[str]) -> dict:
    """Per SFT arm: the mean token weight of each trace style (uniform 1; the oracle 1 on its traces, 0
    elsewhere; PEAR arms their weights from the stored logprobs), the styles' token counts, and the
    shares of tokens at the delta and log-weight clips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scorer.shards import list_shards, read_meta
    from scorer.weights import ragged_weights

    shards = list_shards(scores)
    table = pa.concat_tables([pq.read_table(p, columns=["target_logprobs", "behavior_logprobs", "style"])
                              for p in shards])
    target = [np.asarray(x, np.float64) for x in table.column("target_logprobs").to_pylist()]
    behavior = [np.asarray(x, np.float64) for x in table.column("behavior_logprobs").to_pylist()]
    styles = np.array(table.column("style").to_pylist())
    lengths = np.array([len(x) for x in target])
    token_style = np.repeat(styles, lengths)  # (tokens,)
    out: dict = {"tokens": {st: int((token_style == st).sum()) for st in STYLES}, "arms": {}}
    stored = read_meta(shards[0])
    oracle_col, oracle_values = ORACLE_ONLY.split("=")
    for arm in arms:
        params = arm_weight_params(arm, stored)
        if params is None:  # uniform SFT: 1 on the rows it trains on
            on = np.ones(len(token_style)) if "only" not in ARMS[arm] else \
                np.isin(token_style, oracle_values.split("|")).astype(np.float64)
            out["arms"][arm] = {"mean_weight": {st: float(on[token_style == st].mean()) if (token_style == st).any()
                                                else None for st in STYLES}}
            continue
        w, logw = ragged_weights([list(x) for x in target], [list(x) for x in behavior], params)
        w = np.concatenate([np.asarray(x, np.float64) for x in w])
        logw = np.concatenate([np.asarray(x, np.float64) for x in logw])
        delta = np.concatenate(target) - np.concatenate(behavior)
        lo, hi = params.log_weight_clip
        dlo, dhi = params.delta_clip
        out["arms"][arm] = {
            "params": params.as_dict(),
            "mean_weight": {st: float(w[token_style == st].mean()) if (token_style == st).any() else None
                            for st in STYLES},
            "share_log_weight_at_lo": float(np.mean(logw <= lo + 1e-6)),
            "share_log_weight_at_hi": float(np.mean(logw >= hi - 1e-6)),
            "share_delta_at_lo": float(np.mean(delta <= dlo)), "share_delta_at_hi": float(np.mean(delta >= dhi))}
    return out


# ---- collecting the records ----------------------------------------------------------------------

def pass_k(chain: dict, step: int, k: int) -> np.ndarray:
    """Unbiased pass@k of each prompt of a recorded chain at one RL step."""
    v = chain["steps"][str(step)]
    return np.array([pass_at_k(v["n"], c, k) for c in v["passed"]])


def collect(records: dict[int, dict], seeds: list[int], arms: list[str], recipe: dict, ks: list[int]) -> dict:
    """Per arm, from the draws' records: pass@k after SFT and after RL, the RL gain, the pass@1 curve over
    RL steps and its area, each paired against uniform, the reward curves, the held-out NLL and the
    weights; then the gate, the primary comparison and the share of the oracle's gain PEAR recovers."""
    steps = curve_steps(recipe)
    chains = {(w, arm, s): rec["arms"][arm][f"seed{s}"] for w, rec in records.items() for arm in arms for s in seeds}

    def mats(arm: str, step: int, k: int) -> list[np.ndarray]:  # one (seeds, prompts) array per world draw
        return [np.stack([pass_k(chains[w, arm, s], step, k) for s in seeds]) for w in records]

    at = {(arm, t, k): mats(arm, t, k) for arm in arms for t in steps for k in (ks if t in (0, steps[-1]) else [1])}
    diff = lambda a, b: [x - y for x, y in zip(a, b)]  # noqa: E731
    auc = {arm: [area_under_curve(np.stack(c, axis=-1), steps) for c in zip(*(at[arm, t, 1] for t in steps))]
           for arm in arms}
    res: dict = {"prompts": {str(w): len(rec["prompts"]) for w, rec in records.items()}, "arms": {}}
    for arm in arms:
        r: dict = {"runs": {}}
        for w in records:
            for s in seeds:
                c = chains[w, arm, s]
                # no-sft: the base's NLL, as uniform SFT measured it before training
                nll = c["sft"]["heldout_nll"] if ARMS[arm] else chains[w, "uniform", s]["sft"]["heldout_nll_start"]
                r["runs"][f"world{w}/seed{s}"] = {"reward_curve": c["reward_curve"], "heldout_nll": nll}
        r["heldout_nll"] = float(np.mean([v["heldout_nll"] for v in r["runs"].values()]))
        for k in ks:
            sft, rl = at[arm, 0, k], at[arm, steps[-1], k]
            r.setdefault("after_sft", {})[f"pass@{k}"] = estimate(sft)
            r.setdefault("after_rl", {})[f"pass@{k}"] = estimate(rl)
            r.setdefault("rl_gain", {})[f"pass@{k}"] = estimate(diff(rl, sft))
            if arm != "uniform":
                r.setdefault("vs_uniform_after_rl", {})[f"pass@{k}"] = estimate(diff(rl, at["uniform", steps[-1], k]))
                r.setdefault("vs_uniform_after_sft", {})[f"pass@{k}"] = estimate(diff(sft, at["uniform", 0, k]))
        r["curve"] = {"steps": steps, "pass@1": [estimate(at[arm, t, 1]) for t in steps]}
        r["auc_pass@1"] = estimate(auc[arm])
        if arm != "uniform":
            r["curve"]["vs_uniform"] = [estimate(diff(at[arm, t, 1], at["uniform", t, 1])) for t in steps]
            r["auc_pass@1_vs_uniform"] = estimate(diff(auc[arm], auc["uniform"]))
        r["weights"] = weight_diagnostics(arm, records, seeds)
        res["arms"][arm] = r
    # each arm's paired difference from uniform at each RL step, with its interval
    res["curve"] = {arm: {"steps": steps, "pass@1": [e["mean"] for e in r["curve"]["pass@1"]],
                          **({"diff": [e["mean"] for e in r["curve"]["vs_uniform"]],
                              "lo": [e["ci95"][0] for e in r["curve"]["vs_uniform"]],
                              "hi": [e["ci95"][1] for e in r["curve"]["vs_uniform"]]} if "vs_uniform" in r["curve"]
                             else {})}
                    for arm, r in res["arms"].items()}
    return res


def headline(res: dict) -> dict:
    """experiment.json's top-level answers: the oracle's gain over uniform, the primary comparison and the
    share of the oracle's gain PEAR recovers (Fieller), all on post-RL pass@1."""
    arms = res["arms"]
    pick = lambda e, *keys: {k: e[k] for k in keys}  # noqa: E731
    out: dict = {"oracle": None, "primary": None, "recovered": None}
    if "oracle" in arms:
        e = arms["oracle"]["vs_uniform_after_rl"]["pass@1"]
        out["oracle"] = {"diff": e["mean"], "lo": e["ci95"][0], "hi": e["ci95"][1], **pick(e, "mdd", "method"),
                         "per_world": e["per_world"]}
    if PRIMARY in arms:
        e = arms[PRIMARY]["vs_uniform_after_rl"]["pass@1"]
        out["primary"] = {"arm": PRIMARY, "diff": e["mean"], "lo": e["ci95"][0], "hi": e["ci95"][1],
                          **pick(e, "mdd", "method", "se"), "per_world": e["per_world"]}
        if out["oracle"]:
            num, den = out["primary"]["per_world"], out["oracle"]["per_world"]
            f = fieller(np.array(num), np.array(den)) if len(num) >= 2 else \
                {"share": num[0] / den[0] if den[0] else None, "lo": None, "hi": None, "bounded": False,
                 "method": "one draw: no interval"}
            out["recovered"] = {"share": f["share"], "lo": f["lo"], "hi": f["hi"], "bounded": f["bounded"],
                                "method": f["method"]}
    return out


def gate_check(records: dict[int, dict], seeds: list[int], recipe: dict) -> tuple[dict, dict]:
    """The gate (oracle minus uniform) and the reference (no-sft minus uniform), from the gate arms alone."""
    refs = collect(records, seeds, list(GATE_ARMS), recipe, [1])["arms"]
    return (oracle_gate(refs["oracle"]["vs_uniform_after_rl"]["pass@1"], GATE_MARGIN),
            sft_matters(refs["no-sft"]["vs_uniform_after_rl"]["pass@1"], SFT_MATTERS_MARGIN))


def weight_diagnostics(arm: str, records: dict[int, dict], seeds: list[int]) -> dict | None:
    """An SFT arm's weights, mean over draws: as trained (mean weight, batch ESS), and from the stored
    logprobs: the mean weight of each trace style and the shares of tokens at the clips."""
    if ARMS[arm] is None:
        return None
    trained = [rec["arms"][arm][f"seed{s}"]["sft"] for rec in records.values() for s in seeds]
    out = {"mean_weight_trained": float(np.mean([t["mean_weight"] for t in trained])),
           "batch_ess_fraction_trained": float(np.mean([t["mean_ess_fraction"] for t in trained])),
           "train_rows": float(np.mean([t["train_rows"] for t in trained]))}
    by_style = [rec["weights_by_style"] for rec in records.values()]
    if any(arm not in b["arms"] for b in by_style):  # pear-live: its weights follow the model being trained
        return out
    seen = lambda st: [b["arms"][arm]["mean_weight"][st] for b in by_style  # noqa: E731
                       if b["arms"][arm]["mean_weight"][st] is not None]  # None: no token of that style
    out["mean_weight_by_style"] = {st: float(np.mean(seen(st))) if seen(st) else None for st in STYLES}
    out["style_tokens"] = {st: float(np.mean([b["tokens"][st] for b in by_style])) for st in STYLES}
    for key in ("share_log_weight_at_lo", "share_log_weight_at_hi", "share_delta_at_lo", "share_delta_at_hi"):
        if key in by_style[0]["arms"][arm]:
            out[key] = float(np.mean([b["arms"][arm][key] for b in by_style]))
    return out
