"""Evaluation on held-out prompts: n samples each, unbiased pass@k, mean reward, bootstrap 95% CIs.

    python -m train.eval --model runs/rl/pear --out runs/eval/pear [--tasks chain_sum] [--n 16] [--k 1,2,4,8]
    python -m train.eval --model runs/sft/pear --out runs/eval/sft-pear --prompts heldout.jsonl

Held-out means never seen in SFT or RL. The prompts come from their own seed range (reasoning-gym
tasks with `--prompt-seed`, 30000 by default: the world's eval range) or from `--prompts` (rows of
`prompt` or `messages`), and that is checked, by prompt text, against every prompt set the model
saw: the `--exclude` sets (the embedded SFT corpus by default) and, following the model folder's
provenance, the RL run's `rl_prompts.jsonl` and the scored shards its SFT run trained on. The text
compared is a prompt's `prompt`, or its last user turn when it is a chat, against every training
prompt and every user turn of every training conversation (`train.rollout.COMPARED`, recorded in
eval.json). A prompt that the seed split happens to share with those (small task spaces collide)
is dropped and counted; a remaining overlap is an error.

pass@k per prompt with c of n samples passing is the unbiased 1 - C(n-c, k) / C(n, k) (Chen et
al., 2021), averaged over prompts; the 95% intervals are percentile bootstraps over prompts.
Writes out/eval.json, out/eval.md (a Markdown table), out/samples.jsonl (per-prompt rewards) and
out/reward_errors.jsonl (the samples whose reward call failed; they count as 0).
The RL stage's default prompt pool is left out of every evaluation (`--exclude-rl-pool`), so the
same command before and after RL scores the same prompts; `--baseline <earlier eval folder>` then
adds the paired difference per metric (same prompts, per-prompt differences, paired bootstrap
95% interval) to eval.json and eval.md:

    python -m train.eval --model runs/sft/uniform --out runs/eval/before
    python -m train.eval --model runs/rl/uniform --out runs/eval/after --baseline runs/eval/before
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import numpy as np

from common.config import ConfigError, Stage, field, setup_logging
from common.lock import locked
from common.models import resolve_model
from common.storage import as_path, write_json_atomic
from train.rewards import REWARD_HELP, load_reward, safe_score
from train.rollout import COMPARED, EVAL_PROMPT_SEED, RL_POOL_SIZE, RL_PROMPT_SEED, PromptConfig, RolloutEngine, \
    prompt_token_ids, reasoning_gym_examples, resolve_aliases, resolved, training_prompt_texts

log = logging.getLogger("pear.eval")


@dataclass
class EvalConfig:
    """n samples per held-out prompt; pass@k and mean reward with bootstrap intervals."""

    model: str = field("runs/rl/pear", "model to evaluate (HF folder)")
    out: str = field("runs/eval/pear", "output folder: eval.json, eval.md, samples.jsonl")
    prompt_set: PromptConfig = field(PromptConfig(num_prompts=200, prompt_seed=EVAL_PROMPT_SEED),
                                     "the held-out prompts: --tasks, --task-kwargs, --num-prompts (before dropping "
                                     "any seen ones), --prompt-seed, or --prompts (a file or hub dataset)")
    exclude: tuple[str, ...] = field((),
                                     "prompt sets the eval prompts must not contain (a file, folder, glob, scoring "
                                     "output or hub dataset with a `prompt`, `question` or `messages` column); the "
                                     "model's own RL and SFT prompts are found from its folder and added")
    exclude_rl_pool: bool = field(True, "also leave out the RL stage's default prompt pool (these tasks, seed "
                                        f"{RL_PROMPT_SEED}, {RL_POOL_SIZE} prompts), so that a model evaluated "
                                        "before RL and after it sees the same prompts")
    baseline: str = field("", "an earlier eval folder (e.g. of the model before RL): adds the paired difference "
                              "of each metric on the prompts both share, with a paired bootstrap 95% interval")
    reward: str = field("default", REWARD_HELP)
    pass_threshold: float = field(1.0, "a sample passes when its reward is at least this")
    reward_timeout: float = field(30.0, "seconds one reward call may take before it counts as 0 and is logged "
                                        "(0: no limit)")
    n: int = field(16, "samples per prompt")
    k: tuple[int, ...] = field((1, 2, 4, 8), "pass@k for each k (those above n are skipped)")
    temperature: float = field(1.0, "sampling temperature")
    top_p: float = field(1.0, "nucleus sampling")
    max_new_tokens: int = field(64, "longest response (the default is the embedded world's)")
    bootstrap: int = field(2000, "bootstrap resamples over prompts for the 95% intervals")
    seed: int = field(0, "seed of the engine's sampler and of the bootstrap")
    progress: bool = field(True, "progress bar over the prompts")
    # other trainers' names (TRL's GRPOConfig), on the command line and in YAML; each is moved onto its field
    num_generations: int | None = field(None, "TRL's name for --n")
    max_completion_length: int | None = field(None, "TRL's name for --max-new-tokens")
    ALIASES: ClassVar[dict[str, str]] = {"num_generations": "n", "max_completion_length": "max_new_tokens"}

    def __post_init__(self):
        resolve_aliases(self, self.ALIASES)


# ---- math ------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c passing samples out of n: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which needs no big binomials (Chen et al., 2021).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per prompt), resampling prompts."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)  # (resamples,)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_difference(after: np.ndarray, before: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of per-prompt differences `after - before` (same prompts, same order) with its paired
    percentile bootstrap 95% interval (prompts resampled together, so prompt difficulty cancels)."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)  # (P,)
    lo, hi = bootstrap_ci(d, resamples, seed)
    return {"mean": float(d.mean()) if d.size else float("nan"), "ci95": [lo, hi], "prompts": int(d.size)}


def per_prompt_metrics(rewards: np.ndarray, passed: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Each metric per prompt: mean reward and unbiased pass@k, from (P, n) rewards and passes."""
    n = rewards.shape[1]
    c = passed.sum(axis=1)  # (P,)
    out = {"mean_reward": rewards.mean(axis=1)}
    for k in ks:
        out[f"pass@{k}"] = np.array([pass_at_k(n, int(ci), k) for ci in c])
    return out


def summarize(rewards: np.ndarray, passed: np.ndarray, ks: list[int], resamples: int, seed: int) -> dict:
    """Metrics of one set of prompts: rewards and passed are (P, n)."""
    out = {"prompts": int(rewards.shape[0])}
    for name, v in per_prompt_metrics(rewards, passed, ks).items():
        lo, hi = bootstrap_ci(v, resamples, seed)
        out[name] = {"mean": float(v.mean()), "ci95": [lo, hi]}
    return out


# ---- held-out check ----------------------------------------------------------------------------

def seen_prompt_sets(model_dir: str | Path) -> list[Path]:
    """Prompt sets the model was trained on, found from its folder: RL prompts, then its SFT shards.

    An RL folder has rl_prompts.jsonl and rl_summary.json (-> the starting model), a snapshot of
    it snapshot.json (-> the RL folder); an SFT folder
    has train_summary.json (-> the scored shards, which keep the prompt text). A recorded folder that
    is not there is an error: the check would otherwise pass against fewer prompts (older summaries
    recorded paths relative to where the run started).
    """
    found, folder, hops = [], Path(model_dir), 0
    if (folder / "snapshot.json").exists():  # a model saved mid-run: what its run trained on
        folder = Path(json.loads((folder / "snapshot.json").read_text())["run"])
    while hops < 4:  # RL -> SFT -> scores; a short chain, bounded against loops
        hops += 1
        if (folder / "rl_prompts.jsonl").exists():
            found.append(folder / "rl_prompts.jsonl")
        if (folder / "train_summary.json").exists():
            scores = json.loads((folder / "train_summary.json").read_text()).get("scores", "")
            if scores and not as_path(scores).is_dir():  # a local folder or an object-storage URI
                raise FileNotFoundError(f"{folder / 'train_summary.json'} names the SFT scores {scores!r}, not found "
                                        f"from {Path.cwd()}: the held-out check needs them (run from the folder "
                                        "that SFT ran in, or retrain to record an absolute path)")
            if scores:
                found.append(as_path(scores))
        parent = None
        if (folder / "rl_summary.json").exists():
            summary = json.loads((folder / "rl_summary.json").read_text())
            parent = summary.get("model")
            if parent and not Path(parent).is_dir() and not (summary.get("model_ref") or {}).get("repo_id"):
                raise FileNotFoundError(f"{folder / 'rl_summary.json'} names the starting model {parent!r}, not "
                                        f"found from {Path.cwd()}: the held-out check needs its SFT prompts (run "
                                        "from the folder that RL ran in)")
        if not parent or not Path(parent).is_dir():
            break
        folder = Path(parent)
    return found


def held_out(examples: list[dict], seen: set[str]) -> tuple[list[dict], int]:
    """(examples whose prompt is not in `seen`, how many were dropped)."""
    kept = [ex for ex in examples if ex["prompt"].strip() not in seen]
    return kept, len(examples) - len(kept)


def held_out_set(cfg: EvalConfig) -> tuple[list[dict], int, list, set[str]]:
    """The evaluation's prompts: (examples, how many were dropped, the sets checked against, their texts).

    The split is by seed; prompts it shares by chance with a training set (the --exclude files, the
    model's own RL and SFT prompts, the default RL pool) are dropped, then the rest is checked.
    """
    try:
        ps = cfg.prompt_set
        examples = ps.examples()
        sources = [resolved(x) for x in cfg.exclude if x] + [str(p.resolve()) for p in seen_prompt_sets(cfg.model)]
        seen: set[str] = set()
        for src in sources:
            seen |= training_prompt_texts(src)
        if cfg.exclude_rl_pool and not ps.prompts:
            pool = reasoning_gym_examples(ps.tasks, RL_POOL_SIZE, RL_PROMPT_SEED, ps.task_kwargs)
            seen |= {ex["prompt"].strip() for ex in pool}
            sources.append(f"RL pool ({', '.join(ps.tasks)}, seed {RL_PROMPT_SEED}, {RL_POOL_SIZE} prompts)")
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(str(e)) from None
    rl_summary = Path(cfg.model) / "rl_summary.json"
    rl_source = json.loads(rl_summary.read_text()).get("prompt_source") if rl_summary.exists() else None
    if isinstance(rl_source, dict) and not cfg.prompt_set.prompts:  # task k draws from seed + k
        rl_seeds = {rl_source["seed"] + k for k in range(len(rl_source["tasks"]))}
        seed = cfg.prompt_set.prompt_seed
        if rl_seeds & {seed + k for k in range(len(cfg.prompt_set.tasks))}:
            raise ConfigError(f"--prompt-seed {seed} shares seeds with the RL prompts "
                              f"(seed {rl_source['seed']}): the split is by seed")
    examples, dropped = held_out(examples, seen)
    if dropped:
        log.info("dropped %d eval prompts also found in training prompt sets", dropped)
    if not examples:
        raise ConfigError("no held-out prompts left after removing those seen in training")
    log.info("%d held-out prompts, checked against %d training prompts from %s; compared: %s", len(examples),
             len(seen), ", ".join(map(str, sources)) or "nothing", COMPARED)
    return examples, dropped, sources, seen


def read_eval(folder: str) -> dict:
    """An eval folder: its per-prompt rewards ((prompt, repeat) -> (n,) array) and its pass threshold."""
    samples, report = Path(folder) / "samples.jsonl", Path(folder) / "eval.json"
    if not (samples.exists() and report.exists()):
        raise FileNotFoundError(f"{folder!r} is not an eval folder (no samples.jsonl and eval.json)")
    rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
    keys = occurrence_keys([r["prompt"] for r in rows])
    meta = json.loads(report.read_text())
    return {"folder": folder, "model": meta["model"], "threshold": meta["config"]["pass_threshold"],
            "rewards": {key: np.asarray(r["rewards"], dtype=np.float64) for key, r in zip(keys, rows)}}


def occurrence_keys(prompts: list[str]) -> list[tuple[str, int]]:
    """(prompt text, how many times it came before): a task generator can repeat a prompt, and each
    repeat pairs with the same repeat of another evaluation."""
    seen: dict[str, int] = {}
    keys = []
    for text in prompts:
        text = text.strip()
        keys.append((text, seen.get(text, 0)))
        seen[text] = seen.get(text, 0) + 1
    return keys


def compare_with_baseline(examples: list[dict], rewards: np.ndarray, passed: np.ndarray, ks: list[int],
                          baseline: dict, cfg: EvalConfig) -> dict:
    """This model minus the baseline, per metric, on the prompts both evaluated (paired by prompt)."""
    keys = occurrence_keys([ex["prompt"] for ex in examples])
    shared = [i for i, key in enumerate(keys) if key in baseline["rewards"]]
    base_rewards = [baseline["rewards"][keys[i]] for i in shared]
    if not shared or len({len(r) for r in base_rewards}) != 1:
        raise ConfigError(f"baseline {baseline['folder']} shares no prompts with this evaluation"
                          if not shared else f"baseline {baseline['folder']} has uneven samples per prompt")
    base_rewards = np.stack(base_rewards)  # (S, n_base)
    ks_both = [k for k in ks if k <= base_rewards.shape[1]]
    here = per_prompt_metrics(rewards[shared], passed[shared], ks_both)
    there = per_prompt_metrics(base_rewards, base_rewards >= baseline["threshold"], ks_both)
    out = {"baseline": baseline["folder"], "baseline_model": baseline["model"], "shared_prompts": len(shared),
           "prompts_only_here": len(examples) - len(shared),
           "prompts_only_in_baseline": len(baseline["rewards"]) - len(shared)}
    for name in here:
        out[name] = {"before": float(there[name].mean()), "after": float(here[name].mean()),
                     **paired_difference(here[name], there[name], cfg.bootstrap, cfg.seed)}
    if out["prompts_only_here"] or out["prompts_only_in_baseline"]:
        log.warning("baseline comparison on the %d shared prompts only (%d only here, %d only in the baseline)",
                    len(shared), out["prompts_only_here"], out["prompts_only_in_baseline"])
    return out


# ---- the run -----------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    """The metrics as a Markdown table: one row per metric, one column per prompt set."""
    groups = report["groups"]
    names = list(groups)
    lines = [f"Model `{report['model']}`: {report['prompts']} held-out prompts x {report['n']} samples "
             f"(temperature {report['config']['temperature']}), 95% bootstrap intervals over prompts.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in ["mean_reward"] + [f"pass@{k}" for k in report["k"]]:
        cells = []
        for g in names:
            m = groups[g][metric]
            cells.append(f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| prompts | " + " | ".join(str(groups[g]["prompts"]) for g in names) + " |")
    vs = report.get("vs_baseline")
    if vs:
        lines += ["", f"Against the baseline `{vs['baseline_model']}` ({vs['baseline']}), paired on the "
                      f"{vs['shared_prompts']} prompts both evaluated (95% paired bootstrap over prompts):", "",
                  "| metric | baseline | this model | difference |", "|---|---|---|---|"]
        for metric in ["mean_reward"] + [f"pass@{k}" for k in report["k"] if f"pass@{k}" in vs]:
            m = vs[metric]
            lines.append(f"| {metric} | {m['before']:.3f} | {m['after']:.3f} | {m['mean']:+.3f} "
                         f"[{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"


def recorded_config(cfg: EvalConfig) -> dict:
    """The settings as eval.json records them: of the prompt set, only those that chose the prompts
    (a --prompts run used no tasks, seed or prompt count; a task run no prompt file)."""
    return {**asdict(cfg), "prompt_set": cfg.prompt_set.used()}


def evaluate(cfg: EvalConfig) -> dict:
    """One evaluation; returns the report (also written to out/eval.json and out/eval.md). One
    evaluation per output folder at a time: a second one is refused, naming the holder."""
    with ExitStack() as held:
        return _evaluate(cfg, held)


def _evaluate(cfg: EvalConfig, held: ExitStack) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    # 1. inputs: model, prompts, reward, and the prompt sets the eval must avoid
    model_ref = resolve_model(cfg.model)  # a folder or hub id; loads read its local folder
    cfg = replace(cfg, model=str(Path(model_ref.path).resolve()))  # recorded as found from anywhere
    ks = sorted({k for k in cfg.k if 1 <= k <= cfg.n})
    if len(ks) < len(cfg.k):
        log.warning("pass@k needs k <= n = %d: skipping k in %s", cfg.n, sorted(set(cfg.k) - set(ks)))
    try:
        reward_fn = load_reward(cfg.reward)
        baseline = read_eval(cfg.baseline) if cfg.baseline else None
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(str(e)) from None
    examples, dropped, sources, seen = held_out_set(cfg)
    held.enter_context(locked(cfg.out))  # the inputs are good: from here on the folder is this run's

    # 2. n samples per prompt, rewards
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    prompt_ids = [prompt_token_ids(tokenizer, ex) for ex in examples]  # `messages` when a row has them
    engine = RolloutEngine(cfg.model, max(map(len, prompt_ids)) + cfg.max_new_tokens, seed=cfg.seed)
    try:
        groups = engine.generate(prompt_ids, cfg.n, cfg.temperature, cfg.max_new_tokens, cfg.top_p, logprobs=False,
                                 bar="eval" if cfg.progress else None)
    finally:
        engine.close()
    rewards = np.zeros((len(examples), cfg.n))  # (P, n)
    errors = 0
    samples_path, errors_path = Path(cfg.out) / "samples.jsonl", Path(cfg.out) / "reward_errors.jsonl"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    with open(samples_path, "w") as f, open(errors_path, "w") as failed:
        for i, (ex, group) in enumerate(zip(examples, groups)):
            texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in group]
            row_errors = []
            for j, text in enumerate(texts):
                rewards[i, j], err = safe_score(reward_fn, text, ex, cfg.reward_timeout)
                if err:  # counted as 0; the row, as RL logs it
                    row_errors.append({"sample": j, "error": err})
                    failed.write(json.dumps({"prompt": ex["prompt"], "answer": ex["answer"], "sample": j,
                                             "completion": text, "error": err}) + "\n")
            errors += len(row_errors)
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex["answer"], "task": ex.get("task"),
                                "rewards": rewards[i].tolist(), "first_completion": texts[0],
                                "reward_errors": row_errors}) + "\n")
    if errors:
        first = json.loads(errors_path.read_text().splitlines()[0])["error"]
        log.warning("%d reward calls failed and count as 0 (first: %s); rows in %s", errors, first, errors_path)
    passed = rewards >= cfg.pass_threshold

    # 3. metrics for all prompts, and per task when there are several
    report_groups = {"all": summarize(rewards, passed, ks, cfg.bootstrap, cfg.seed)}
    tasks = [ex.get("task") for ex in examples]
    if len(set(tasks)) > 1:
        for t in sorted(set(tasks), key=str):
            idx = np.array([x == t for x in tasks])
            report_groups[str(t)] = summarize(rewards[idx], passed[idx], ks, cfg.bootstrap, cfg.seed)
    report = {
        "model": cfg.model, "model_ref": asdict(model_ref), "n": cfg.n, "k": ks, "prompts": len(examples),
        "groups": report_groups,
        "held_out": {"checked_against": [str(s) for s in sources], "compared": COMPARED, "training_prompts": len(seen),
                     "dropped_overlapping": dropped, "overlap_after_check": 0},
        "reward_errors": errors, "seconds": round(time.perf_counter() - t0, 2), "config": recorded_config(cfg),
    }
    if baseline is not None:
        report["vs_baseline"] = compare_with_baseline(examples, rewards, passed, ks, baseline, cfg)
    write_json_atomic(report, Path(cfg.out) / "eval.json")
    (Path(cfg.out) / "eval.md").write_text(markdown(report))
    return report


STAGE = Stage(EvalConfig, lambda cfg: (evaluate(cfg), cfg.out),
              lambda done: f"{markdown(done[0])}\nreport in {done[1]}/eval.json and {done[1]}/eval.md", __doc__,
              log="eval.log")


def main(argv=None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
