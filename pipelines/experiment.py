"""`make experiment`: does PEAR-weighted SFT help the RL that follows, in a world where SFT matters?

    python -m pipelines.experiment                         # the sft-matters world, 3 draws (time in results/)
    python -m pipelines.experiment --world embedded        # the default world, where SFT does not matter after RL
    python -m pipelines.experiment --smoke                 # one draw of the embedded world, a few steps

Worlds. A world draw is one build of a kind of world (pipelines/world.py WORLDS) from one seed;
another seed, or another machine, builds another draw. The experiment runs on several draws
(`--worlds`), and its intervals resample them, then the seeds within each, then the prompts.

Order. The references run first: no SFT (RL from the base) and uniform SFT, on every draw and
seed. Their post-RL pass@1 decides whether SFT matters in this world (no-SFT at least 0.10 below
uniform, the interval below 0). Only then do the other arms run; where the rule fails they do not
(unless --pear-arms always), since a world where the SFT start does not change where RL ends
cannot tell one SFT weighting from another.

Arms (`ARMS`): no SFT, uniform SFT, PEAR sequence, token and block, pear-live (delta from the model
being trained), and a learning-rate control: uniform SFT at the learning rate times the mean stored
PEAR weight of the pear-token arm (PEAR's average step, no per-token shape; AdamW divides a
constant loss scale out, so the control scales the learning rate). Every arm then runs the same RL
recipe and is evaluated on the same held-out prompts before RL, at fixed RL steps (snapshots) and
after RL. The recipes are those of `make sft`, `make rl` and `make eval` for a model of the
embedded world (recipes/embedded-{sft,rl,eval}.yaml, given as `--config`, the experiment's flags
after them), so a user can reproduce any arm by hand.

Each stage is a child process and is skipped when its output exists, so a killed experiment
resumes where it stopped. Writes experiment.json, experiment.md and three PNG plots into --results.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import console
from common.config import ConfigError, cli, field, setup_logging
from pipelines.experiment_stats import area_under_curve, estimate, sft_matters
from pipelines.recipes import RECIPES, STAGES, embedded_config, recipe_file, recipe_settings
from pipelines.stages import command as stages_command
from pipelines.world import WORLDS, build, world_config, world_dir
from train.eval import per_prompt_metrics, read_eval

log = logging.getLogger("pear.experiment")
MATCHED = "<lr x mean weight of pear-token>"  # resolved from each world's scored shards before its arms run
ARMS = {  # arm -> SFT flags (None: no SFT)
    "no-sft": None,
    "uniform": ["--weighting", "uniform"],
    "lr-control": ["--weighting", "uniform", "--lr", MATCHED],
    "pear-sequence": ["--weighting", "pear", "--variant", "sequence"],
    "pear-token": ["--weighting", "pear", "--variant", "token"],
    "pear-block": ["--weighting", "pear", "--variant", "block"],
    "pear-live": ["--weighting", "pear-live"],
}
REFERENCES = ("no-sft", "uniform")
# the references, the primary arm and its control; the other variants when asked for (ARMS=), to keep
# `make experiment` within two hours on 2 cores
DEFAULT_ARMS = ("no-sft", "uniform", "lr-control", "pear-token")
PRIMARY = "pear-token"  # the arm the decision rule is about (the paper's B = 1)
PEAR_ARMS = ("if-sft-matters", "always")  # when the arms other than the references run
SFT_MATTERS_MARGIN = 0.10
CURVE_STEPS = "10,25,50,100"  # RL steps with a snapshot to evaluate, besides 0 and the last
# The one recipe: the embedded recipes of `make sft`, `make rl`, `make eval` (their YAML files),
# one CPU thread per stage (two chains share the 2 cores), then what --smoke changes.
SFT_RECIPE, RL_RECIPE, EVAL_RECIPE = (embedded_config(s, []) for s in STAGES)
RECIPE = {
    "sft": SFT_RECIPE,
    "rl": RL_RECIPE + ["--save-every", "50", "--threads", "1", "--snapshot-steps", CURVE_STEPS],
    "eval": EVAL_RECIPE + ["--k", "1,2,4,8,16"],
    "curve_eval": ["--n", "8", "--k", "1"],  # at the snapshots: pass@1 only, half the samples
}
SMOKE = {
    "sft": SFT_RECIPE + ["--max-steps", "4"],
    "rl": RL_RECIPE + ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "4", "--save-every", "0",
                       "--threads", "1", "--snapshot-steps", "2"],
    "eval": EVAL_RECIPE + ["--num-prompts", "24", "--n", "16", "--k", "1,16", "--bootstrap", "200"],
    "curve_eval": ["--n", "8", "--k", "1"],
}
DECISION = f"""\
Written before the arms ran (pipelines/experiment.py DECISION), and applied as written:

1. The world first. In each kind of world, no-sft and uniform run before any PEAR arm. SFT matters
   there when no-sft's post-RL pass@1 is at least {SFT_MATTERS_MARGIN:.2f} below uniform's and the 95%
   interval of the difference lies below 0. Where it does not, no PEAR arm is run and the world says
   nothing about PEAR.
2. The primary comparison: held-out pass@1 after the last RL step, {PRIMARY} minus uniform, paired by
   world draw, seed and prompt, with the 95% interval of the world/seed/prompt bootstrap. PEAR helps
   if the interval lies above 0, hurts if it lies below 0, and neither otherwise (then the minimum
   detectable difference says how large an effect could have gone unseen).
3. Secondary, reported whatever they say and not deciding: the other PEAR variants and pear-live
   where they were run (ARMS), the area under the pass@1 curve over RL steps (does RL get there
   sooner?), pass@16 after RL, and the learning-rate control (is a difference from PEAR's per-token
   shape or from its smaller average step?). No correction for the number of secondary
   comparisons: read them as such."""


def setting(args: list[str], name: str) -> str:
    """The value of setting `name` (a field: `lr`, `k`) that a stage gets from an argument list of one
    embedded recipe file (`--config`) and flags: the last flag's, else the file's (a list joined by commas)."""
    flag = "--" + name.replace("_", "-")
    if flag in args:
        return args[len(args) - 1 - args[::-1].index(flag) + 1]
    stage = next(s for s in STAGES if str(recipe_file(s)) in args)
    value = recipe_settings(stage)[name]
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def curve_steps(recipe: dict) -> list[int]:
    """The RL steps evaluated: 0 (the SFT model), each snapshot, the last."""
    snaps = [int(x) for x in setting(recipe["rl"], "snapshot_steps").split(",") if x.strip()]
    return sorted({0, *snaps, int(setting(recipe["rl"], "steps"))})


def eval_dir(run: Path, step: int, last: int) -> Path:
    """The evaluation folder of one arm and seed at one RL step."""
    return run / ("eval-sft" if step == 0 else "eval-rl" if step == last else f"eval-step{step:06d}")


def shown(args: list[str]) -> list[str]:
    """An argument list as experiment.json records it: the recipe files relative to the repository."""
    return [str(Path(a).relative_to(RECIPES.parent)) if a.startswith(str(RECIPES)) else a for a in args]


def stages(todo: list[tuple[list[str], Path]], log_file: Path, env: dict) -> None:
    """Run the stages (`module, *args`, the file each leaves when done) not yet done, all in one process
    (pipelines.stages); their output goes to `log_file`."""
    cmds = [cmd for cmd, done in todo if not done.exists()]
    if not cmds:
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "a") as f:
        rc = subprocess.run(stages_command(cmds), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    missing = [cmd for cmd, done in todo if not done.exists()]
    if rc != 0 or missing:
        raise RuntimeError(f"stage failed (exit {rc}): {' '.join(missing[0] if missing else cmds[-1])}; see {log_file}")
    log.info("%s done in %.0fs", log_file.parent, time.time() - t0)


def sft_flags(arm: str, recipe: list[str], matched_weight: float) -> list[str]:
    """The recipe, then the arm's own flags (later flags win); the control's lr is the recipe's times the weight."""
    lr = float(setting(recipe, "lr")) * matched_weight
    return recipe + [f"{lr:.6g}" if a == MATCHED else a for a in ARMS[arm]]


# ---- one world draw ------------------------------------------------------------------------------

class Draw:
    """One world draw of the experiment: its models and corpus, its run folder, its scored corpus."""

    def __init__(self, kind: str, seed: int, root: Path):
        self.kind, self.seed = kind, seed
        self.world = world_dir(seed, kind)
        self.root = root / f"world{seed}"
        self.scores = self.root / "score"
        self.env = {**os.environ, "PEAR_WORLD": kind, "PEAR_WORLD_SEED": str(seed)}

    def prepare(self) -> float:
        """Build the world (cached) and score its corpus (cached); returns the control's matched weight."""
        build(self.world, world_config(self.seed, self.kind))
        subprocess.run([sys.executable, "-m", "pipelines.score", "--out", str(self.scores), "--executor", "local"],
                       check=True, stdout=subprocess.DEVNULL, env=self.env)
        return mean_stored_weight(self.scores)

    def run_arm(self, arm: str, seed: int, recipe: dict, matched_weight: float, env: dict) -> None:
        """SFT (unless no-sft) -> RL with snapshots -> evaluation of the SFT model, each snapshot and the
        RL model, on the same held-out prompts, in one process (run.log beside them)."""
        d = self.root / arm / f"seed{seed}"
        s, env = ["--seed", str(seed)], {**env, **self.env}
        start = str(self.world / "target") if ARMS[arm] is None else str(d / "sft")
        todo = [] if ARMS[arm] is None else [
            (["train.sft", "--scores", str(self.scores), "--out", start, "--progress", "false",
              *sft_flags(arm, recipe["sft"], matched_weight), *s], d / "sft" / "train_summary.json")]
        todo.append((["train.rl", "--model", start, "--out", str(d / "rl"), "--progress", "false", *recipe["rl"], *s],
                     d / "rl" / "rl_summary.json"))
        steps = curve_steps(recipe)
        ev = recipe["eval"] + ["--exclude", str(self.world / "corpus-unfiltered.parquet"), *s]
        models = {0: start, steps[-1]: str(d / "rl")}
        for step in steps:
            model = models.get(step, str(d / "rl" / "snapshots" / f"step-{step:06d}"))
            extra = (["--baseline", str(eval_dir(d, 0, steps[-1]))] if step == steps[-1]
                     else recipe["curve_eval"] if step else [])
            out = eval_dir(d, step, steps[-1])
            todo.append((["train.eval", "--model", model, "--out", str(out), "--progress", "false", *ev, *extra],
                         out / "eval.json"))
        stages(todo, d / "run.log", env)


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


# ---- collecting the evaluations ------------------------------------------------------------------

def per_prompt(folder: Path, k: int) -> dict[tuple[str, int], float]:
    """Unbiased pass@k of each prompt of an eval folder, keyed by (prompt, occurrence), at its own threshold."""
    ev = read_eval(str(folder))
    keys = list(ev["rewards"])
    rewards = np.stack([ev["rewards"][key] for key in keys])  # (P, n)
    return dict(zip(keys, per_prompt_metrics(rewards, rewards >= ev["threshold"], [k])[f"pass@{k}"]))


def common_keys(folders: list[Path]) -> list:
    """The prompt keys every evaluation of a world draw shares (the same by construction; checked)."""
    sets = [set(per_prompt(f, 1)) for f in folders]
    keys = sorted(set.intersection(*sets))
    if any(len(x) != len(keys) for x in sets):
        log.warning("evaluations differ in their prompts; comparing on the %d all share", len(keys))
    return keys


def collect(draws: list[Draw], seeds: list[int], arms: list[str], recipe: dict, ks: list[int]) -> dict:
    """Per arm: pass@k after SFT and after RL, the RL gain, the pass@1 curve over RL steps and its area,
    each paired against uniform, the reward curves, the held-out NLL and the weight diagnostics."""
    steps = curve_steps(recipe)
    runs = {(d.seed, arm, s): d.root / arm / f"seed{s}" for d in draws for arm in arms for s in seeds}
    keys = {d.seed: common_keys([eval_dir(runs[d.seed, arm, s], t, steps[-1]) for arm in arms for s in seeds
                                 for t in steps]) for d in draws}

    def mats(arm: str, step: int, k: int) -> list[np.ndarray]:  # one (seeds, prompts) array per world draw
        out = []
        for d in draws:
            rows = [per_prompt(eval_dir(runs[d.seed, arm, s], step, steps[-1]), k) for s in seeds]
            out.append(np.array([[r[key] for key in keys[d.seed]] for r in rows], dtype=np.float64))
        return out

    at = {(arm, t, k): mats(arm, t, k) for arm in arms for t in steps for k in (ks if t in (0, steps[-1]) else [1])}
    diff = lambda a, b: [x - y for x, y in zip(a, b)]  # noqa: E731
    auc = {arm: [area_under_curve(np.stack(c, axis=-1), steps) for c in zip(*(at[arm, t, 1] for t in steps))]
           for arm in arms}
    res: dict = {"prompts": {str(d.seed): len(keys[d.seed]) for d in draws}, "arms": {}}
    for arm in arms:
        r: dict = {"runs": {}}
        for d in draws:
            for s in seeds:
                run = runs[d.seed, arm, s]
                metrics = [json.loads(x) for x in (run / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
                summary = run / "sft" / "train_summary.json" if ARMS[arm] else \
                    runs[d.seed, "uniform", s] / "sft" / "train_summary.json"  # the base's NLL, before uniform SFT
                nll = json.loads(summary.read_text())["heldout_nll" if ARMS[arm] else "heldout_nll_start"]
                r["runs"][f"world{d.seed}/seed{s}"] = {"reward_curve": [m["mean_reward"] for m in metrics],
                                                       "heldout_nll": nll}
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
        r["weights"] = weight_diagnostics(arm, draws, seeds)
        res["arms"][arm] = r
    res["curve"] = {arm: {"steps": steps, "pass@1": [e["mean"] for e in r["curve"]["pass@1"]],
                          "lo": [e["ci95"][0] for e in r["curve"]["pass@1"]],
                          "hi": [e["ci95"][1] for e in r["curve"]["pass@1"]]} for arm, r in res["arms"].items()}
    return res


def reference_check(draws: list[Draw], seeds: list[int], recipe: dict) -> dict:
    """The SFT-matters rule, from the no-sft and uniform arms alone."""
    refs = collect(draws, seeds, list(REFERENCES), recipe, [1])["arms"]
    return sft_matters(refs["no-sft"]["vs_uniform_after_rl"]["pass@1"], SFT_MATTERS_MARGIN)


def weight_diagnostics(arm: str, draws: list[Draw], seeds: list[int]) -> dict | None:
    """Share of deltas at each clip bound, ESS and mean weight of the arm's SFT weights (mean over draws)."""
    if ARMS[arm] is None:
        return None
    summaries = [json.loads((d.root / arm / f"seed{s}" / "sft" / "train_summary.json").read_text())
                 for d in draws for s in seeds]
    out = {"mean_weight_trained": float(np.mean([t["mean_weight"] for t in summaries])),
           "batch_ess_fraction_trained": float(np.mean([t["mean_ess_fraction"] for t in summaries]))}
    variant = {"pear-sequence": "sequence", "pear-token": "token", "pear-block": "block"}.get(arm)
    if variant:  # the corpus-wide distribution, from the scoring summaries
        vs = [json.loads((d.scores / "summary.json").read_text())["variants"][variant] for d in draws]
        mean = lambda f: float(np.mean([f(v) for v in vs]))  # noqa: E731
        out.update({"share_delta_at_lo": mean(lambda v: v["share_at_delta_clip"]["lo"]),
                    "share_delta_at_hi": mean(lambda v: v["share_at_delta_clip"]["hi"]),
                    "share_log_weight_at_lo": mean(lambda v: v["share_at_log_weight_clip"]["lo"]),
                    "share_log_weight_at_hi": mean(lambda v: v["share_at_log_weight_clip"]["hi"]),
                    "ess_tokens_fraction": mean(lambda v: v["ess_tokens_fraction"]),
                    "ess_sequences_fraction": mean(lambda v: v["ess_sequences_fraction"]),
                    "weight_mean": mean(lambda v: v["weight_mean"])})
    return out


def wall_minutes(draws: list[Draw]) -> float:
    """Minutes from the first scored corpus to the last evaluation, read off the files the stages wrote
    (a report rebuilt from cached stages states the run's own time; a resumed run includes its pause)."""
    start = min(f.stat().st_mtime for d in draws for f in d.scores.glob("*.parquet"))
    end = max(f.stat().st_mtime for d in draws for f in d.root.glob("*/seed*/eval-*/eval.json"))
    return (end - start) / 60


def machine() -> str:
    """The machine as measured: CPU cores and the GPU, if any."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- the run ---------------------------------------------------------------------------------------

def run_chains(draws: list[Draw], arms: list[str], seeds: list[int], recipe: dict, weights: dict, jobs: int,
               t0: float) -> None:
    """Every (draw, arm, seed) chain, `jobs` at once, each on its own core and one thread (tiny models
    gain nothing from a second thread, and two chains keep both cores busy)."""
    cores = queue.Queue()
    for i in range(jobs):
        cores.put(i % (os.cpu_count() or 1))

    def chain(d: Draw, arm: str, seed: int) -> None:
        core = cores.get()  # each running chain keeps to its own core (vLLM binds its threads)
        try:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            d.run_arm(arm, seed, recipe, weights[d.seed], env)
        finally:
            cores.put(core)

    chains = [(d, arm, seed) for d in draws for seed in seeds for arm in arms]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(chain, *c): c for c in chains}
        for fut, (d, arm, seed) in futures.items():
            fut.result()
            log.info("world %d arm %s seed %d complete (%.0f min so far)", d.seed, arm, seed, (time.time() - t0) / 60)


@dataclass
class ExperimentConfig:
    """The PEAR experiment: the references, the SFT-matters rule, then the other arms."""

    world: str = field("", f"the kind of world, one of {', '.join(WORLDS)}; empty: PEAR_WORLD (make's WORLD), "
                           "else sft-matters (embedded with --smoke)")
    worlds: str = field("", "world draws (seeds), comma-separated; empty: 0,1,2 (0 with --smoke)")
    seeds: int = field(1, "SFT and RL seeds per world draw")
    out: str = field("", "run folder; empty: runs/experiment/<world>, or runs/experiment-smoke with --smoke")
    results: str = field("", "report folder; empty: results/ for sft-matters, results/<world>/ for another, "
                             "the run folder for --smoke")
    smoke: bool = field(False, "one draw, a few steps: checks that the outputs are complete")
    jobs: int = field(2, "arm-seed chains run at once (each on one CPU thread)")
    arms: str = field(",".join(DEFAULT_ARMS), f"comma-separated arms among {', '.join(ARMS)} "
                                              "(no-sft and uniform, the references, among them)")
    pear_arms: str = field("", "if-sft-matters: run the arms other than the references only where SFT matters; "
                               "always: in any world; empty: if-sft-matters, always with --smoke (whose few "
                               "steps decide nothing)")

    def __post_init__(self):  # before any work: one line, exit code 2
        if self.world and self.world not in WORLDS:
            raise ConfigError(f"--world {self.world}: not a world; the worlds are {', '.join(WORLDS)}")
        if self.pear_arms and self.pear_arms not in PEAR_ARMS:
            raise ConfigError(f"--pear-arms {self.pear_arms}: one of {', '.join(PEAR_ARMS)}")
        arms = self.arm_list()
        if set(arms) - set(ARMS) or not set(REFERENCES) <= set(arms):
            raise ConfigError(f"--arms {self.arms}: arms among {', '.join(ARMS)}, no-sft and uniform included")
        try:
            self.world_seeds()
        except ValueError:
            raise ConfigError(f"--worlds {self.worlds}: comma-separated integers") from None

    def arm_list(self) -> list[str]:
        return [x.strip() for x in self.arms.split(",") if x.strip()]

    def world_seeds(self) -> list[int]:
        return [int(x) for x in (self.worlds or ("0" if self.smoke else "0,1,2")).split(",") if x.strip()]

    def kind(self) -> str:
        """The kind of world: --world, else PEAR_WORLD (read when the experiment starts), else the default."""
        kind = self.world or os.environ.get("PEAR_WORLD") or ("embedded" if self.smoke else "sft-matters")
        if kind not in WORLDS:
            raise ConfigError(f"PEAR_WORLD={kind} is not a world; the worlds are {', '.join(WORLDS)}")
        return kind


def run(cfg: ExperimentConfig) -> Path:
    """Every stage (each cached), then the report; returns the report's folder."""
    from pipelines.experiment_report import check_complete, markdown, plots

    arms = cfg.arm_list()
    kind = cfg.kind()
    worlds = cfg.world_seeds()
    t0 = time.time()
    seeds = list(range(cfg.seeds))
    recipe = SMOKE if cfg.smoke else RECIPE
    root = Path(cfg.out or ("runs/experiment-smoke" if cfg.smoke else f"runs/experiment/{kind}"))
    results = Path(cfg.results or (root if cfg.smoke else "results" if kind == "sft-matters" else f"results/{kind}"))
    console.quiet(root / "experiment.log")
    ks = [int(k) for k in setting(recipe["eval"], "k").split(",")]

    # 1. each world draw, its scored corpus (both cached) and the control's matched weight
    draws = [Draw(kind, w, root) for w in worlds]
    weights = {}
    for d in draws:
        weights[d.seed] = d.prepare()
        log.info("world %s seed %d: lr-control at the learning rate x %.4f", kind, d.seed, weights[d.seed])

    # 2. the references, then the rule, then the other arms where it holds
    run_chains(draws, list(REFERENCES), seeds, recipe, weights, cfg.jobs, t0)
    check = reference_check(draws, seeds, recipe)
    log.info("SFT matters after RL: %s (no-sft minus uniform %.3f [%.3f, %.3f])", check["holds"], check["diff"],
             check["lo"], check["hi"])
    if not check["holds"] and (cfg.pear_arms or ("always" if cfg.smoke else "if-sft-matters")) == "if-sft-matters":
        log.info("the other arms are not run: SFT does not matter after RL in this world")
        arms = list(REFERENCES)
    run_chains(draws, [x for x in arms if x not in REFERENCES], seeds, recipe, weights, cfg.jobs, t0)
    arms = [x for x in ARMS if x in arms]  # the report's order

    # 3. the report
    res = collect(draws, seeds, arms, recipe, ks)
    results.mkdir(parents=True, exist_ok=True)
    meta = {"command": "make experiment-smoke" if cfg.smoke else "make experiment", "world": kind,
            "world_settings": WORLDS[kind], "seeds": len(seeds), "machine": machine(),
            "minutes": round(wall_minutes(draws), 1), "arms": arms, "date": time.strftime("%Y-%m-%d"),
            "commit": commit(), "samples_per_prompt": int(setting(recipe["eval"], "n")),
            "curve_samples_per_prompt": int(setting(recipe["curve_eval"], "n")),
            "lr_control_factor": weights, "world_builds": {str(d.seed): world_facts(d) for d in draws}}
    report = {"meta": meta, "worlds": worlds, "sft_matters": check, "decision_rule": DECISION,
              "recipe": {k: shown(v) for k, v in recipe.items()},
              "recipe_files": {k: recipe_settings(k) for k in STAGES},
              "recipe_steps": int(setting(recipe["rl"], "steps")), **res}
    (results / "experiment.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "experiment.md").write_text(markdown(report, ks))
    plots(report, ks, results)
    check_complete(results, worlds, seeds, ks)
    return results


def main(argv=None) -> int:
    setup_logging()
    # the report on the terminal is experiment.md itself
    return cli(ExperimentConfig, argv, __doc__, run, lambda results: (results / "experiment.md").read_text())


def world_facts(d: Draw) -> dict:
    """What a world draw's build recorded: its corpus size and the behavior's accuracy."""
    built = json.loads((d.world / "world.json").read_text())
    return {"folder": str(d.world), "corpus_rows": built["corpus_rows"],
            "behavior_accuracy": round(built["behavior_accuracy"], 4)}


if __name__ == "__main__":
    sys.exit(main())
