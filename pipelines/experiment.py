"""`make experiment`: does PEAR-weighted SFT help the RL that follows, on the embedded world?

    python -m pipelines.experiment                 # 5 arms x 3 seeds; about an hour on 2 cores
    python -m pipelines.experiment --smoke         # 1 seed, a few steps: checks the outputs only

Arms: no SFT (RL from the base), uniform SFT, PEAR sequence, PEAR token, PEAR block. Every arm
then runs the same RL recipe with the same budget, and is evaluated (pass@k on held-out prompts)
after SFT and after RL. One recipe for all arms: the arms differ only in the SFT weighting.
Each stage is a child process (`train.sft`, `train.rl`, `train.eval`) and is skipped when its
output exists, so a killed experiment resumes where it stopped. Writes `experiment.json`,
`experiment.md` and two PNG plots into --results.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipelines.sft import EMBEDDED_RECIPE
from pipelines.world import WorldConfig, build
from train.eval import bootstrap_ci, pass_at_k

log = logging.getLogger("pear.experiment")
WORLD = Path("artifacts/world")
ARMS = {  # arm -> SFT flags (None: no SFT)
    "no-sft": None,
    "uniform": ["--weighting", "uniform"],
    "pear-sequence": ["--weighting", "pear", "--variant", "sequence"],
    "pear-token": ["--weighting", "pear", "--variant", "token"],
    "pear-block": ["--weighting", "pear", "--variant", "block"],
}
# The one recipe. Full run, then what --smoke changes.
RECIPE = {
    "sft": EMBEDDED_RECIPE + ["--epochs", "3"],
    # lr 1e-4: from 2e-4 up RL on the 2-layer model collapsed (reward to 0 within 40 steps, all arms)
    "rl": ["--steps", "30", "--prompts-per-step", "16", "--samples-per-prompt", "8", "--max-new-tokens", "64",
           "--lr", "1e-4", "--save-every", "10", "--threads", "1"],
    "eval": ["--num-prompts", "100", "--n", "16", "--k", "1,2,4,8", "--max-new-tokens", "64"],
}
SMOKE = {
    "sft": EMBEDDED_RECIPE + ["--max-steps", "4"],
    "rl": ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "4", "--max-new-tokens", "48",
           "--lr", "1e-3", "--save-every", "0", "--threads", "1"],
    "eval": ["--num-prompts", "12", "--n", "8", "--k", "1,8", "--max-new-tokens", "48", "--bootstrap", "200"],
}
KS = ("pass@1", "pass@8")


def stage(cmd: list[str], done: Path, log_file: Path, env: dict) -> None:
    """Run one stage unless its output exists; its output goes to a log file beside the result."""
    if done.exists():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "w") as f:
        rc = subprocess.run([sys.executable, "-m", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not done.exists():
        raise RuntimeError(f"stage failed (exit {rc}): {' '.join(cmd)}; see {log_file}")
    log.info("%s done in %.0fs", done.parent, time.time() - t0)


def run_arm(arm: str, seed: int, root: Path, scores: Path, recipe: dict, env: dict) -> None:
    """SFT (unless no-sft) -> RL -> evaluation of the SFT model and of the RL model, for one arm and seed."""
    d = root / arm / f"seed{seed}"
    s = ["--seed", str(seed)]
    if ARMS[arm] is None:
        start = str(WORLD / "target")
    else:
        start = str(d / "sft")
        stage(["train.sft", "--scores", str(scores), "--out", start, "--progress", "false", *ARMS[arm],
               *recipe["sft"], *s], d / "sft" / "train_summary.json", d / "sft.log", env)
    stage(["train.rl", "--model", start, "--out", str(d / "rl"), "--progress", "false", *recipe["rl"], *s],
          d / "rl" / "rl_summary.json", d / "rl.log", env)
    # before and after RL on the same held-out prompts: both drop what the RL run saw
    exclude = f"{WORLD / 'corpus.parquet'},{d / 'rl' / 'rl_prompts.jsonl'}"
    stage(["train.eval", "--model", start, "--out", str(d / "eval-sft"), "--exclude", exclude, *recipe["eval"], *s],
          d / "eval-sft" / "eval.json", d / "eval-sft.log", env)
    stage(["train.eval", "--model", str(d / "rl"), "--out", str(d / "eval-rl"), *recipe["eval"], *s],
          d / "eval-rl" / "eval.json", d / "eval-rl.log", env)


# ---- collecting the results ---------------------------------------------------------------------

def per_prompt_pass(samples: Path, k: int) -> np.ndarray:
    """Unbiased pass@k of each prompt from an eval's samples.jsonl."""
    rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
    return np.array([pass_at_k(len(r["rewards"]), int(sum(v >= 1.0 for v in r["rewards"])), k) for r in rows])


def collect(root: Path, seeds: list[int], ks: list[int]) -> dict:
    """Per arm: per-seed numbers, means over seeds, and bootstrap intervals over prompts x seeds."""
    out = {}
    for arm in ARMS:
        arm_res = {"seeds": {}}
        for seed in seeds:
            d = root / arm / f"seed{seed}"
            rl_steps = [json.loads(x) for x in (d / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
            r = {"reward_curve": [m["mean_reward"] for m in rl_steps]}
            for phase in ("sft", "rl"):
                ev = json.loads((d / f"eval-{phase}" / "eval.json").read_text())["groups"]["all"]
                r[f"after_{phase}"] = {f"pass@{k}": ev[f"pass@{k}"]["mean"] for k in ks}
                r[f"after_{phase}"]["mean_reward"] = ev["mean_reward"]["mean"]
            if ARMS[arm] is not None:
                ts = json.loads((d / "sft" / "train_summary.json").read_text())
                r["heldout_nll"] = ts["heldout_nll"]
            else:  # the base's held-out NLL, as measured before the first SFT step of another arm
                other = root / "uniform" / f"seed{seed}" / "sft" / "train_summary.json"
                r["heldout_nll"] = json.loads(other.read_text())["heldout_nll_start"]
            arm_res["seeds"][seed] = r
        for phase in ("sft", "rl"):
            agg = {}
            for k in ks:
                pooled = np.concatenate([per_prompt_pass(root / arm / f"seed{s}" / f"eval-{phase}" / "samples.jsonl", k)
                                         for s in seeds])
                per_seed = [arm_res["seeds"][s][f"after_{phase}"][f"pass@{k}"] for s in seeds]
                lo, hi = bootstrap_ci(pooled, 2000, 0)
                agg[f"pass@{k}"] = {"mean": float(np.mean(per_seed)), "seed_sd": float(np.std(per_seed)),
                                    "ci95": [lo, hi]}
            arm_res[f"after_{phase}"] = agg
        arm_res["heldout_nll"] = float(np.mean([arm_res["seeds"][s]["heldout_nll"] for s in seeds]))
        out[arm] = arm_res
    return out


def statement(res: dict, ks: list[int]) -> str:
    """What the numbers show, in plain words, whichever way they go."""
    top = f"pass@{max(ks)}"
    base = res["uniform"]["after_rl"][top]
    lines = []
    for arm in ("pear-sequence", "pear-token", "pear-block"):
        a = res[arm]["after_rl"][top]
        diff = a["mean"] - base["mean"]
        overlap = not (a["ci95"][0] > base["ci95"][1] or a["ci95"][1] < base["ci95"][0])
        verdict = ("within the noise (the 95% intervals overlap)" if overlap else
                   "better than uniform SFT (intervals do not overlap)" if diff > 0 else
                   "worse than uniform SFT (intervals do not overlap)")
        lines.append(f"- {arm}: post-RL {top} {a['mean']:.3f} vs uniform {base['mean']:.3f} "
                     f"({diff:+.3f}), {verdict}.")
    best_sft = min((a for a in res if a != "no-sft"), key=lambda a: res[a]["heldout_nll"])
    best_rl = max(res, key=lambda a: res[a]["after_rl"][top]["mean"])
    lines.append(f"- Lowest held-out NLL after SFT (the offline SFT metric): {best_sft}; "
                 f"highest {top} after RL: {best_rl}.")
    nr = res["no-sft"]["after_rl"][top]["mean"]
    lines.append(f"- RL from the base without SFT reaches {top} {nr:.3f}.")
    return "\n".join(lines)


def markdown(res: dict, ks: list[int], meta: dict) -> str:
    f = lambda x: f"{x['mean']:.3f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]"  # noqa: E731
    head = ("| arm | held-out NLL after SFT | " + " | ".join(f"pass@{k} after SFT" for k in ks) + " | "
            + " | ".join(f"pass@{k} after RL" for k in ks) + " |")
    lines = [f"# PEAR experiment on the embedded world", "",
             f"{meta['seeds']} seeds per arm, one SFT/RL/eval recipe for all arms (in experiment.json). "
             f"Made by `{meta['command']}` on {meta['machine']} in {meta['minutes']:.0f} minutes, {meta['date']}.",
             "pass@k: mean over seeds of the unbiased estimator on held-out prompts; brackets: bootstrap 95% "
             "interval over prompts of all seeds.", "", head, "|" + "---|" * (1 + 2 * len(ks) + 1)]
    for arm, r in res.items():
        lines.append(f"| {arm} | {r['heldout_nll']:.3f} | " + " | ".join(f(r["after_sft"][f"pass@{k}"]) for k in ks)
                     + " | " + " | ".join(f(r["after_rl"][f"pass@{k}"]) for k in ks) + " |")
    lines += ["", "## What the numbers show", "", statement(res, ks), "",
              "![reward curves](experiment_reward_curves.png)", "",
              "![offline metric vs post-RL pass@k](experiment_offline_vs_rl.png)", ""]
    return "\n".join(lines)


def plots(res: dict, ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, r in res.items():
        curves = np.array([s["reward_curve"] for s in r["seeds"].values()])  # (seeds, steps)
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, curves.mean(0), label=arm)
        ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.set_title("RL reward per arm (line: mean over seeds; band: min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "experiment_reward_curves.png", dpi=110)

    top = f"pass@{max(ks)}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, r in res.items():
        xs = [s["heldout_nll"] for s in r["seeds"].values()]
        ys = [s["after_rl"][top] for s in r["seeds"].values()]
        ax.scatter(xs, ys, label=arm)
    ax.set_xlabel("held-out NLL on behavior traces after SFT (lower: better SFT)")
    ax.set_ylabel(f"{top} after RL")
    ax.set_title("Offline SFT metric vs post-RL result (one point per arm and seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "experiment_offline_vs_rl.png", dpi=110)


def check_complete(results: Path, seeds: list[int], ks: list[int]) -> None:
    """The outputs exist and hold every arm, seed and number (what the smoke run asserts)."""
    data = json.loads((results / "experiment.json").read_text())
    for arm in ARMS:
        r = data["arms"][arm]
        assert set(map(int, r["seeds"])) == set(seeds), arm
        for phase in ("after_sft", "after_rl"):
            for k in ks:
                v = r[phase][f"pass@{k}"]
                assert 0.0 <= v["mean"] <= 1.0 and v["ci95"][0] <= v["ci95"][1], (arm, phase, k)
        for s in r["seeds"].values():
            assert len(s["reward_curve"]) == data["recipe_steps"], arm
            assert np.isfinite(s["heldout_nll"])
    for name in ("experiment.md", "experiment_reward_curves.png", "experiment_offline_vs_rl.png"):
        assert (results / name).stat().st_size > 0, name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None, help="run folder (default runs/experiment, or runs/experiment-smoke)")
    p.add_argument("--results", default=None, help="report folder (default results/, or the run folder for --smoke)")
    p.add_argument("--smoke", action="store_true", help="one seed, a few steps: checks that the outputs are complete")
    p.add_argument("--jobs", type=int, default=2, help="arm-seed chains run at once (each on one CPU thread)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    seeds = [0] if a.smoke else list(range(a.seeds))
    recipe = SMOKE if a.smoke else RECIPE
    root = Path(a.out or ("runs/experiment-smoke" if a.smoke else "runs/experiment"))
    results = Path(a.results or (root if a.smoke else "results"))
    ks = [int(k) for k in recipe["eval"][recipe["eval"].index("--k") + 1].split(",")]

    # 1. the world and its scored corpus (cached)
    build(WORLD, WorldConfig())
    scores = root / "score"
    subprocess.run([sys.executable, "-m", "pipelines.score", "--out", str(scores), "--executor", "local"],
                   check=True, stdout=subprocess.DEVNULL)

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
            run_arm(arm, seed, root, scores, recipe, env)
        finally:
            cores.put(core)

    chains = [(arm, seed) for seed in seeds for arm in ARMS]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(chain, arm, seed): (arm, seed) for arm, seed in chains}
        for fut, (arm, seed) in futures.items():
            fut.result()
            log.info("arm %s seed %d complete (%.0f min so far)", arm, seed, (time.time() - t0) / 60)

    # 3. the report
    res = collect(root, seeds, ks)
    results.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": len(seeds), "command": "make experiment-smoke" if a.smoke else "make experiment",
            "machine": f"{os.cpu_count()} CPU cores, no GPU", "minutes": (time.time() - t0) / 60,
            "date": time.strftime("%Y-%m-%d")}
    steps = int(recipe["rl"][recipe["rl"].index("--steps") + 1])
    (results / "experiment.json").write_text(json.dumps(
        {"meta": meta, "recipe": recipe, "recipe_steps": steps, "arms": res}, indent=1) + "\n")
    (results / "experiment.md").write_text(markdown(res, ks, meta))
    plots(res, ks, results)
    check_complete(results, seeds, ks)
    print((results / "experiment.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
