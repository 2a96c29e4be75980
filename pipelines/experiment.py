"""`make experiment`: does PEAR-weighted SFT help the RL that follows, on the embedded world?

    python -m pipelines.experiment                 # 7 arms x 4 seeds on 2 cores (time in results/)
    python -m pipelines.experiment --smoke         # 1 seed, a few steps: checks the outputs only

Arms (`ARMS`): no SFT (RL from the base), uniform SFT, PEAR sequence, token and block, pear-live
(delta from the model being trained), and a learning-rate control: uniform SFT at the learning
rate times the mean stored PEAR weight of the pear-token arm (PEAR's average step, no per-token
shape). The control scales the learning rate, not the loss: AdamW divides a constant loss scale
out (with `--uniform-weight 0.25` the parameters move about as far as with 1; tests/test_sft.py),
so "every token weighs the mean weight" would not give PEAR's smaller average step. Every arm
then runs the same RL recipe with the same budget and is evaluated on the same held-out prompts
after SFT and after RL. The recipes are the ones `make sft`, `make rl` and
`make eval` give a model of the embedded world (recipes/embedded-{sft,rl,eval}.yaml, passed as
`--config`, with the experiment's own flags after them), so a user can reproduce any arm by hand.

Statistics: every arm and seed is evaluated on the same prompts, so differences are paired by
prompt and seed; intervals come from a two-level bootstrap (seeds, then prompts within each
seed), which counts the seed-to-seed spread of RL as well as the prompt sample. The minimum
detectable difference (80% power, two-sided 5%) is 2.8 standard errors of that bootstrap.

Each stage is a child process (`train.sft`, `train.rl`, then both `train.eval` runs of an arm in
one process, `pipelines/stages.py`) and is skipped when its output exists, so a killed experiment
resumes where it stopped. Writes `experiment.json`, `experiment.md` and two PNG plots into
--results.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import console
from common.config import setup_logging
from pipelines.recipes import RECIPES, STAGES, embedded_config, recipe_file, recipe_settings
from pipelines.rl import world_exclude
from pipelines.world import WorldConfig, build, world_dir
from train.eval import per_prompt_metrics, read_eval

log = logging.getLogger("pear.experiment")
WORLD = world_dir()
MATCHED = "<lr x mean weight of pear-token>"  # resolved from the scored shards before the arms run
ARMS = {  # arm -> SFT flags (None: no SFT)
    "no-sft": None,
    "uniform": ["--weighting", "uniform"],
    "lr-control": ["--weighting", "uniform", "--lr", MATCHED],
    "pear-sequence": ["--weighting", "pear", "--variant", "sequence"],
    "pear-token": ["--weighting", "pear", "--variant", "token"],
    "pear-block": ["--weighting", "pear", "--variant", "block"],
    "pear-live": ["--weighting", "pear-live"],
}
# The one recipe: the embedded recipes of `make sft`, `make rl`, `make eval` (their YAML files),
# one CPU thread per stage (two chains share the 2 cores), then what --smoke changes.
SFT_RECIPE, RL_RECIPE = embedded_config("sft", []), embedded_config("rl", [])
EVAL_RECIPE = embedded_config("eval", []) + world_exclude()
RECIPE = {
    "sft": SFT_RECIPE,
    "rl": RL_RECIPE + ["--save-every", "50", "--threads", "1"],
    "eval": EVAL_RECIPE,
}
SMOKE = {
    "sft": SFT_RECIPE + ["--max-steps", "4"],
    "rl": RL_RECIPE + ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "4", "--save-every", "0",
                       "--threads", "1"],
    "eval": EVAL_RECIPE + ["--num-prompts", "24", "--n", "8", "--k", "1,8", "--bootstrap", "200"],
}
BOOTSTRAP = 2000
Z_POWER = 1.96 + 0.84  # two-sided 5% test with 80% power: the difference must be 2.8 standard errors


def setting(args: list[str], name: str) -> str:
    """The value of setting `name` (a field: `lr`, `k`) that a stage gets from an argument list of one
    embedded recipe file (`--config`) and flags: the last flag's, else the file's (a list joined by commas)."""
    flag = "--" + name.replace("_", "-")
    if flag in args:
        return args[len(args) - 1 - args[::-1].index(flag) + 1]
    stage = next(s for s in STAGES if str(recipe_file(s)) in args)
    value = recipe_settings(stage)[name]
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def shown(args: list[str]) -> list[str]:
    """An argument list as experiment.json records it: the recipe files relative to the repository."""
    return [str(Path(a).relative_to(RECIPES.parent)) if a.startswith(str(RECIPES)) else a for a in args]


def stage(cmds: list[list[str]], done: Path, log_file: Path, env: dict) -> None:
    """Run a stage's commands (`module, *args`; several share one process) unless `done` exists;
    their output goes to a log file beside the result."""
    if done.exists():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    args = ["-m", *cmds[0]] if len(cmds) == 1 else ["-m", "pipelines.stages", json.dumps(cmds)]
    with open(log_file, "w") as f:
        rc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not done.exists():
        raise RuntimeError(f"stage failed (exit {rc}): {' ; '.join(map(' '.join, cmds))}; see {log_file}")
    log.info("%s done in %.0fs", done.parent, time.time() - t0)


def sft_flags(arm: str, recipe: list[str], matched_weight: float) -> list[str]:
    """The recipe, then the arm's own flags (later flags win); the control's lr is the recipe's times the weight."""
    lr = float(setting(recipe, "lr")) * matched_weight
    return recipe + [f"{lr:.6g}" if a == MATCHED else a for a in ARMS[arm]]


def run_arm(arm: str, seed: int, root: Path, scores: Path, recipe: dict, matched_weight: float, env: dict) -> None:
    """SFT (unless no-sft) -> RL -> evaluation of the SFT model and of the RL model, for one arm and seed."""
    d = root / arm / f"seed{seed}"
    s = ["--seed", str(seed)]
    if ARMS[arm] is None:
        start = str(WORLD / "target")
    else:
        start = str(d / "sft")
        stage([["train.sft", "--scores", str(scores), "--out", start, "--progress", "false",
                *sft_flags(arm, recipe["sft"], matched_weight), *s]], d / "sft" / "train_summary.json",
              d / "sft.log", env)
    stage([["train.rl", "--model", start, "--out", str(d / "rl"), "--progress", "false", *recipe["rl"], *s]],
          d / "rl" / "rl_summary.json", d / "rl.log", env)
    # before and after RL on the same held-out prompts (the eval leaves out the corpus and the RL
    # pool), in one process
    stage([["train.eval", "--model", start, "--out", str(d / "eval-sft"), *recipe["eval"], *s],
           ["train.eval", "--model", str(d / "rl"), "--out", str(d / "eval-rl"), "--baseline", str(d / "eval-sft"),
            *recipe["eval"], *s]], d / "eval-rl" / "eval.json", d / "eval.log", env)


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


# ---- statistics ---------------------------------------------------------------------------------

def per_prompt(eval_dir: Path, k: int) -> dict[tuple[str, int], float]:
    """Unbiased pass@k of each prompt of an eval folder, keyed by (prompt, occurrence), at its own threshold."""
    ev = read_eval(str(eval_dir))
    keys = list(ev["rewards"])
    rewards = np.stack([ev["rewards"][key] for key in keys])  # (P, n)
    return dict(zip(keys, per_prompt_metrics(rewards, rewards >= ev["threshold"], [k])[f"pass@{k}"]))


def matrix(root: Path, arm: str, phase: str, seeds: list[int], k: int, keys: list) -> np.ndarray:
    """(seeds, prompts) pass@k of one arm and phase on the common prompt keys."""
    rows = []
    for s in seeds:
        pp = per_prompt(root / arm / f"seed{s}" / f"eval-{phase}", k)
        rows.append([pp[key] for key in keys])
    return np.array(rows, dtype=np.float64)


def two_level_bootstrap(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means of a (seeds, prompts) array: seeds resampled, then prompts within each seed."""
    rng = np.random.default_rng(seed)
    S, P = x.shape
    s_idx = rng.integers(0, S, size=(resamples, S))  # (R, S)
    p_idx = rng.integers(0, P, size=(resamples, S, P))  # (R, S, P)
    return x[s_idx[..., None], p_idx].mean(axis=(1, 2))  # (R,)


def estimate(x: np.ndarray, seed: int = 0) -> dict:
    """Mean, 95% interval, standard error and minimum detectable difference of a (seeds, prompts) array."""
    means = two_level_bootstrap(x, BOOTSTRAP, seed)
    se = float(means.std(ddof=1))
    return {"mean": float(x.mean()), "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "se": se, "mdd": Z_POWER * se, "per_seed": [float(v) for v in x.mean(axis=1)]}


def common_keys(root: Path, seeds: list[int], arms: list[str]) -> list:
    """The prompt keys every arm, seed and phase was evaluated on (the same by construction; checked)."""
    sets = [set(per_prompt(root / arm / f"seed{s}" / f"eval-{phase}", 1))
            for arm in arms for s in seeds for phase in ("sft", "rl")]
    keys = sorted(set.intersection(*sets))
    if any(len(x) != len(keys) for x in sets):
        log.warning("evaluations differ in their prompts; comparing on the %d all share", len(keys))
    return keys


def weight_diagnostics(arm: str, root: Path, seeds: list[int], scores: Path) -> dict | None:
    """Share of deltas at each clip bound, ESS and mean weight of the arm's SFT weights."""
    if ARMS[arm] is None:
        return None
    summaries = [json.loads((root / arm / f"seed{s}" / "sft" / "train_summary.json").read_text()) for s in seeds]
    out = {"mean_weight_trained": float(np.mean([t["mean_weight"] for t in summaries])),
           "batch_ess_fraction_trained": float(np.mean([t["mean_ess_fraction"] for t in summaries]))}
    variant = {"pear-sequence": "sequence", "pear-token": "token", "pear-block": "block"}.get(arm)
    if variant:  # the corpus-wide distribution, from the scoring summary
        v = json.loads((scores / "summary.json").read_text())["variants"][variant]
        out.update({"share_delta_at_lo": v["share_at_delta_clip"]["lo"],
                    "share_delta_at_hi": v["share_at_delta_clip"]["hi"],
                    "share_log_weight_at_lo": v["share_at_log_weight_clip"]["lo"],
                    "share_log_weight_at_hi": v["share_at_log_weight_clip"]["hi"],
                    "ess_tokens_fraction": v["ess_tokens_fraction"],
                    "ess_sequences_fraction": v["ess_sequences_fraction"],
                    "weight_mean": v["weight_mean"]})
    return out


def collect(root: Path, seeds: list[int], ks: list[int], scores: Path, arms: list[str]) -> dict:
    """Per arm: pass@k after SFT and after RL, the RL gain, the paired difference from uniform,
    the reward curves, the held-out NLL and the weight diagnostics."""
    keys = common_keys(root, seeds, arms)
    out = {"prompts": len(keys), "arms": {}}
    mats = {(arm, phase, k): matrix(root, arm, phase, seeds, k, keys)
            for arm in arms for phase in ("sft", "rl") for k in ks}
    for arm in arms:
        r: dict = {"seeds": {}}
        for s in seeds:
            d = root / arm / f"seed{s}"
            steps = [json.loads(x) for x in (d / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
            if ARMS[arm] is not None:
                nll = json.loads((d / "sft" / "train_summary.json").read_text())["heldout_nll"]
            else:  # the base's held-out NLL, as measured before the first SFT step of another arm
                nll = json.loads((root / "uniform" / f"seed{s}" / "sft" / "train_summary.json").read_text())[
                    "heldout_nll_start"]
            r["seeds"][s] = {"reward_curve": [m["mean_reward"] for m in steps], "heldout_nll": nll}
        r["heldout_nll"] = float(np.mean([v["heldout_nll"] for v in r["seeds"].values()]))
        for k in ks:
            sft, rl = mats[(arm, "sft", k)], mats[(arm, "rl", k)]
            r.setdefault("after_sft", {})[f"pass@{k}"] = estimate(sft)
            r.setdefault("after_rl", {})[f"pass@{k}"] = estimate(rl)
            r.setdefault("rl_gain", {})[f"pass@{k}"] = estimate(rl - sft)
            if arm != "uniform":
                r.setdefault("vs_uniform_after_rl", {})[f"pass@{k}"] = estimate(rl - mats[("uniform", "rl", k)])
                r.setdefault("vs_uniform_after_sft", {})[f"pass@{k}"] = estimate(sft - mats[("uniform", "sft", k)])
        r["weights"] = weight_diagnostics(arm, root, seeds, scores)
        out["arms"][arm] = r
    return out


# ---- the report ---------------------------------------------------------------------------------

def excludes_zero(e: dict) -> bool:
    return e["ci95"][0] > 0 or e["ci95"][1] < 0


def statement(res: dict, ks: list[int]) -> str:
    """What the numbers show, in plain words, whichever way they go."""
    arms, top = res["arms"], f"pass@{max(ks)}"
    u = arms["uniform"]
    lines = []
    for arm in arms:
        g = arms[arm]["rl_gain"]["pass@1"]
        lines.append(f"- RL from {arm}: pass@1 {arms[arm]['after_sft']['pass@1']['mean']:.3f} -> "
                     f"{arms[arm]['after_rl']['pass@1']['mean']:.3f} ({g['mean']:+.3f}, 95% [{g['ci95'][0]:+.3f}, "
                     f"{g['ci95'][1]:+.3f}]{'' if excludes_zero(g) else ', not distinguishable from 0'}).")
    base = arms["no-sft"]["vs_uniform_after_sft"]["pass@1"]  # base minus uniform SFT, paired
    lo, hi = -base["ci95"][1], -base["ci95"][0]
    lines.append(f"- Uniform SFT on the filtered behavior corpus moves held-out pass@1 of the base "
                 f"({arms['no-sft']['after_sft']['pass@1']['mean']:.3f}) by {-base['mean']:+.3f}, 95% [{lo:+.3f}, "
                 f"{hi:+.3f}]{'' if lo > 0 or hi < 0 else ', not distinguishable from 0'}.")
    for arm in [a for a in arms if a != "uniform"]:
        for k in ("pass@1", top):
            d = arms[arm]["vs_uniform_after_rl"][k]
            verdict = ("better than uniform" if d["ci95"][0] > 0 else "worse than uniform" if d["ci95"][1] < 0
                       else "not distinguishable from uniform")
            lines.append(f"- {arm} after RL, {k}: {d['mean']:+.3f} vs uniform, 95% [{d['ci95'][0]:+.3f}, "
                         f"{d['ci95'][1]:+.3f}], {verdict} (detectable: {d['mdd']:.3f}).")
    best_sft = min((a for a in arms if a != "no-sft"), key=lambda a: arms[a]["heldout_nll"])
    best_rl = max(arms, key=lambda a: arms[a]["after_rl"][top]["mean"])
    lines.append(f"- Lowest held-out NLL after SFT (the offline SFT metric): {best_sft}; highest {top} after RL: "
                 f"{best_rl} ({u['after_rl'][top]['mean']:.3f} for uniform).")
    return "\n".join(lines)


def markdown(res: dict, ks: list[int], meta: dict) -> str:
    arms = res["arms"]
    f = lambda x: f"{x['mean']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]"  # noqa: E731
    g = lambda x: f"{x['mean']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"  # noqa: E731
    top = f"pass@{max(ks)}"
    mdd = max(arms[a]["vs_uniform_after_rl"]["pass@1"]["mdd"] for a in arms if a != "uniform")
    lines = [
        "# PEAR experiment on the embedded world", "",
        f"Made by `{meta['command']}` on {meta['machine']}, {meta['date']}, in {meta['minutes']:.0f} minutes "
        "from the scored corpus to the last evaluation "
        f"(commit {meta['commit']}). {meta['seeds']} seed{'s' if meta['seeds'] > 1 else ''} per arm, "
        f"{res['prompts']} held-out prompts x "
        f"{meta['samples_per_prompt']} samples, the same prompts for every arm, seed and phase. Recipe in "
        "experiment.json (the embedded recipes of `make sft`, `make rl`, `make eval`).", "",
        "The question (Zhang et al., 2026): does PEAR-weighted SFT, then RL, beat plain SFT, then RL, in pass@k "
        "after RL? The paper reports pass@8 gains of up to 14.6% on AIME-2025 after identical RL.", "",
        "Numbers: mean over seeds and prompts; brackets: 95% two-level bootstrap interval (seeds, then prompts). "
        f"Minimum detectable difference from uniform in post-RL pass@1 (80% power, 5% two-sided): "
        f"{mdd:.3f} at most over the arms.", "",
        "| arm | held-out NLL after SFT | pass@1 after SFT | pass@1 after RL | RL gain, pass@1 | "
        f"{top} after RL | pass@1 after RL vs uniform | {top} after RL vs uniform |",
        "|---|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        vs = r.get("vs_uniform_after_rl")
        lines.append(f"| {arm} | {r['heldout_nll']:.3f} | {f(r['after_sft']['pass@1'])} | "
                     f"{f(r['after_rl']['pass@1'])} | {g(r['rl_gain']['pass@1'])} | {f(r['after_rl'][top])} | "
                     f"{g(vs['pass@1']) if vs else '-'} | {g(vs[top]) if vs else '-'} |")
    lines += ["", "Weights each arm trained with (corpus-wide shares from the scoring summary; mean weight and "
              "batch ESS as trained):", "",
              "| arm | mean weight | delta at lo clip | delta at hi clip | log G at lo clip | "
              "ESS tokens | ESS sequences |",
              "|---|---|---|---|---|---|---|"]
    p = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for arm, r in arms.items():
        w = r["weights"]
        if w is None:
            continue
        lines.append(f"| {arm} | {w['mean_weight_trained']:.3f} | {p(w.get('share_delta_at_lo'))} | "
                     f"{p(w.get('share_delta_at_hi'))} | {p(w.get('share_log_weight_at_lo'))} | "
                     f"{p(w.get('ess_tokens_fraction', w['batch_ess_fraction_trained']))} | "
                     f"{p(w.get('ess_sequences_fraction'))} |")
    lines += ["", "## What the numbers show", "", statement(res, ks), "",
              "![reward curves](experiment_reward_curves.png)", "",
              "![offline metric vs post-RL pass@k](experiment_offline_vs_rl.png)", ""]
    return "\n".join(lines)


def plots(res: dict, ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = res["arms"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, r in arms.items():
        curves = np.array([s["reward_curve"] for s in r["seeds"].values()])  # (seeds, steps)
        x = np.arange(1, curves.shape[1] + 1)
        w = max(1, curves.shape[1] // 15)  # moving average over w steps, for a readable line
        smooth = np.array([np.convolve(c, np.ones(w) / w, mode="valid") for c in curves])
        ax.plot(x[w - 1:], smooth.mean(0), label=arm)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.set_title("RL reward per arm (mean over seeds, moving average)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "experiment_reward_curves.png", dpi=110)
    plt.close(fig)

    top = f"pass@{max(ks)}"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, r in arms.items():
        xs = [s["heldout_nll"] for s in r["seeds"].values()]
        ys = r["after_rl"][top]["per_seed"]
        ax.scatter(xs, ys, label=arm)
    ax.set_xlabel("held-out NLL on behavior traces after SFT (lower: better SFT)")
    ax.set_ylabel(f"{top} after RL")
    ax.set_title("Offline SFT metric vs post-RL result (one point per arm and seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "experiment_offline_vs_rl.png", dpi=110)
    plt.close(fig)


def check_complete(results: Path, seeds: list[int], ks: list[int]) -> None:
    """The outputs exist and hold every arm, seed and number; raises ValueError naming what is missing."""
    data = json.loads((results / "experiment.json").read_text())
    problems = []
    for arm in data.get("meta", {}).get("arms", ARMS):  # the arms the run was asked for
        r = data["arms"].get(arm)
        if r is None:
            problems.append(f"arm {arm} missing")
            continue
        if set(map(int, r["seeds"])) != set(seeds):
            problems.append(f"{arm}: seeds {sorted(r['seeds'])} instead of {seeds}")
        for phase in ("after_sft", "after_rl", "rl_gain"):
            for k in ks:
                v = r[phase][f"pass@{k}"]
                if not (np.isfinite(v["mean"]) and v["ci95"][0] <= v["mean"] <= v["ci95"][1] + 1e-12):
                    problems.append(f"{arm} {phase} pass@{k}: {v}")
        for s in r["seeds"].values():
            if len(s["reward_curve"]) != data["recipe_steps"]:
                problems.append(f"{arm}: reward curve of {len(s['reward_curve'])} steps")
            if not np.isfinite(s["heldout_nll"]):
                problems.append(f"{arm}: held-out NLL {s['heldout_nll']}")
    for name in ("experiment.md", "experiment_reward_curves.png", "experiment_offline_vs_rl.png"):
        if not (results / name).exists() or (results / name).stat().st_size == 0:
            problems.append(f"{name} missing or empty")
    if problems:
        raise ValueError("incomplete experiment report: " + "; ".join(problems))


def machine() -> str:
    """The machine as measured: CPU cores and the GPU, if any."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}"


def wall_minutes(root: Path, seeds: list[int], arms: list[str]) -> float:
    """Minutes from the scored corpus to the last evaluation, read off the files the stages wrote
    (so a report rebuilt from cached stages still states the run's own time; a resumed run
    includes its pause)."""
    start = min(f.stat().st_mtime for f in (root / "score").glob("*.parquet"))
    end = max((root / arm / f"seed{s}" / "eval-rl" / "eval.json").stat().st_mtime for arm in arms for s in seeds)
    return (end - start) / 60


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default=None, help="run folder (default runs/experiment, or runs/experiment-smoke)")
    p.add_argument("--results", default=None, help="report folder (default results/, or the run folder for --smoke)")
    p.add_argument("--smoke", action="store_true", help="one seed, a few steps: checks that the outputs are complete")
    p.add_argument("--jobs", type=int, default=2, help="arm-seed chains run at once (each on one CPU thread)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run (uniform and no-sft, the "
                                                        "references of the report, always among them)")
    a = p.parse_args(argv)
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if set(arms) - set(ARMS) or not {"uniform", "no-sft"} <= set(arms):
        p.error(f"--arms {a.arms}: arms among {', '.join(ARMS)}, uniform and no-sft included")
    setup_logging()
    t0 = time.time()
    seeds = [0] if a.smoke else list(range(a.seeds))
    recipe = SMOKE if a.smoke else RECIPE
    root = Path(a.out or ("runs/experiment-smoke" if a.smoke else "runs/experiment"))
    results = Path(a.results or (root if a.smoke else "results"))
    console.quiet(root / "experiment.log")
    ks = [int(k) for k in setting(recipe["eval"], "k").split(",")]

    # 1. the world, its scored corpus (cached) and the control's matched weight
    build(WORLD, WorldConfig())
    scores = root / "score"
    subprocess.run([sys.executable, "-m", "pipelines.score", "--out", str(scores), "--executor", "local"],
                   check=True, stdout=subprocess.DEVNULL)
    matched_weight = mean_stored_weight(scores)
    log.info("lr-control: learning rate x %.4f, the mean stored pear-token weight", matched_weight)

    # 2. every arm and seed; chains in parallel, one CPU thread each (tiny models gain nothing
    #    from a second thread, and two chains keep both cores busy)
    cores = queue.Queue()
    for i in range(a.jobs):
        cores.put(i % (os.cpu_count() or 1))

    def chain(arm: str, seed: int) -> None:
        core = cores.get()  # each running chain keeps to its own core (vLLM binds its threads)
        try:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            run_arm(arm, seed, root, scores, recipe, matched_weight, env)
        finally:
            cores.put(core)

    chains = [(arm, seed) for seed in seeds for arm in arms]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(chain, arm, seed): (arm, seed) for arm, seed in chains}
        for fut, (arm, seed) in futures.items():
            fut.result()
            log.info("arm %s seed %d complete (%.0f min so far)", arm, seed, (time.time() - t0) / 60)

    # 3. the report
    res = collect(root, seeds, ks, scores, arms)
    results.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": len(seeds), "command": "make experiment-smoke" if a.smoke else "make experiment",
            "machine": machine(), "minutes": round(wall_minutes(root, seeds, arms), 1), "arms": arms,
            "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "samples_per_prompt": int(setting(recipe["eval"], "n")), "lr_control_factor": matched_weight}
    (results / "experiment.json").write_text(json.dumps(
        {"meta": meta, "recipe": {k: shown(v) for k, v in recipe.items()},
         "recipe_files": {k: recipe_settings(k) for k in recipe}, "recipe_steps": int(setting(recipe["rl"], "steps")),
         **res},
        indent=1) + "\n")
    (results / "experiment.md").write_text(markdown(res, ks, meta))
    plots(res, ks, results)
    check_complete(results, seeds, ks)
    print((results / "experiment.md").read_text(), file=console.out())
    return 0


if __name__ == "__main__":
    sys.exit(main())
