"""`make experiment`: does PEAR-weighted SFT help the RL that follows, in a world where the SFT data's
weighting can change where RL ends?

    python -m pipelines.experiment                         # the sft-matters world, its confirmation draws
    python -m pipelines.experiment --world embedded        # the default world, where SFT does not matter after RL
    python -m pipelines.experiment --smoke                 # one draw of the embedded world, a few steps

Worlds. A world draw is one build of a kind of world (pipelines/world.py WORLDS) from one seed;
another seed, or another machine, builds another draw. Draws that were looked at while a world's
settings were chosen are its selection draws (SELECTION_DRAWS); the experiment runs on fresh
confirmation draws (CONFIRMATION_DRAWS), listed with the arms and the decision rule (DECISION) in
pipelines/experiment_design.py before any of them ran; pipelines/experiment_records.py keeps what
each finished chain measured and makes the report's numbers from it. The intervals are
t-intervals over the draws (pipelines/experiment_stats.py).

Order. The gate arms run first on every draw: no SFT (RL from the base), uniform SFT and the oracle
(uniform SFT on only the corpus traces the target can carry out: the corpus's `style` column).
Their post-RL pass@1 decides whether weighting the SFT data can change where RL ends in this world
(oracle minus uniform at least 0.10, the interval above 0). Only then do the PEAR arms run; where the
gate fails they do not (unless --pear-arms always), and the report stops there.

Arms (`ARMS`): the gate arms; PEAR token with the stored weights (the primary), a learning-rate
control (uniform SFT at the learning rate times pear-token's mean stored weight: PEAR's average step,
no per-token shape; AdamW divides a constant loss scale out, so the control scales the learning
rate); PEAR token with the lower delta clip at -0.5 and -1.0 and PEAR sequence, their weights
recomputed from the stored logprobs at training time; block and pear-live when asked for. Every arm
then runs the same RL recipe and is evaluated on the same held-out prompts before RL, at fixed RL
steps (snapshots) and after RL. The recipes are those of `make sft`, `make rl` and `make eval` for a
model of the embedded world (recipes/embedded-{sft,rl,eval}.yaml, given as `--config`, the
experiment's flags after them), so a user can reproduce any arm by hand.

Runs and records. Each stage is a child process and is skipped when its output exists. Once an
arm's chain is evaluated, what the report needs of it (per-prompt successes at every evaluated step,
reward curve, held-out NLL, weights) goes into its draw's record, `<results>/experiment-draws/
<world>-<draw>.json`, small enough to commit, and its models are deleted. A later checkout with the
records resumes from the chains they hold. Each record carries the fingerprint of its draw's build
(pipelines.world.built_with: kernel path, threads, torch); a draw whose world here was, or would be,
built with another fingerprint is refused, so draws of two machines never mix.
Writes experiment.json, experiment.md and three PNG plots into --results.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import console
from common.config import ConfigError, cli, field, setup_logging
from pipelines.experiment_design import (ARMS, CONFIRMATION_DRAWS, DECISION, DEFAULT_ARMS, GATE_ARMS, PEAR_ARMS,
                                         PRIMARY, RECIPE, SELECTION_DRAWS, SMOKE, curve_steps, eval_dir, setting,
                                         sft_settings)
from pipelines.experiment_records import (aligned, chain_record, collect, gate_check, headline, mean_stored_weight,
                                          prune, weights_by_style, write_record)
from pipelines.recipes import STAGES, recipe_settings
from pipelines.stages import command as stages_command
from pipelines.stages import stage
from pipelines.world import WORLDS, build, built_with, world_config, world_dir

__all__ = ["ARMS", "CONFIRMATION_DRAWS", "RECIPE", "SELECTION_DRAWS", "SMOKE", "Draw", "ExperimentConfig",
           "FingerprintError", "main", "mean_stored_weight", "run", "sft_settings", "write_record", "write_report"]

log = logging.getLogger("pear.experiment")

def stages(todo: list[tuple[dict, Path]], log_file: Path, env: dict) -> None:
    """Run the stages (pipelines/stages.py items, the file each leaves when done) not yet done, all in
    one process (pipelines.stages); their output goes to `log_file`."""
    items = [item for item, done in todo if not done.exists()]
    if not items:
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "a") as f:
        rc = subprocess.run(stages_command(items), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    missing = [item for item, done in todo if not done.exists()]
    if rc != 0 or missing:
        raise RuntimeError(f"stage failed (exit {rc}): {json.dumps(missing[0] if missing else items[-1])}; "
                           f"see {log_file}")
    log.info("%s done in %.0fs", log_file.parent, time.time() - t0)


# ---- one world draw ------------------------------------------------------------------------------

PREPARING = threading.Lock()


class FingerprintError(RuntimeError):
    """A draw's world was, or would be, built with another fingerprint than the one its record holds."""


class Draw:
    """One world draw of the experiment: its world, its run folder, its scored corpus and its record
    (what the report needs of every chain that finished, in <results>/experiment-draws/)."""

    def __init__(self, kind: str, seed: int, root: Path, records: Path):
        self.kind, self.seed = kind, seed
        self.world = world_dir(seed, kind)
        self.root = root / f"world{seed}"
        self.scores = self.root / "score"
        self.record_path = records / f"{kind}-{seed}.json"
        self.env = {**os.environ, "PEAR_WORLD": kind, "PEAR_WORLD_SEED": str(seed)}
        self.lock = threading.Lock()  # two chains of one draw may finish at once
        self.prepared: tuple[frozenset, float | None] | None = None  # (arms prepared for, matched weight)

    def record(self) -> dict:
        return json.loads(self.record_path.read_text()) if self.record_path.exists() else {}

    def has(self, arm: str, seed: int) -> bool:
        return f"seed{seed}" in self.record().get("arms", {}).get(arm, {})

    def check_fingerprint(self) -> dict:
        """The fingerprint of this draw's build: the world's, else the one this machine would build with;
        raises FingerprintError where it differs from the one the draw's record holds."""
        marker = self.world / "world.json"
        here = json.loads(marker.read_text()).get("built_with") if marker.exists() else None
        here = here or built_with()
        recorded = self.record().get("built_with")
        if recorded and recorded != here:
            raise FingerprintError(
                f"world draw {self.seed}: its record {self.record_path} was made from a build with {recorded}, and "
                f"{'the world in ' + str(self.world) + ' was built' if marker.exists() else 'this machine builds'} "
                f"with {here}: another draw, which must not be mixed with it. Build it with the recorded kernel "
                "path and threads (ATEN_CPU_CAPABILITY=..., `make world ARGS=--threads N`), or run on a machine "
                "that makes that draw.")
        return here

    def prepare(self, arms: list[str], seeds: list[int]) -> float | None:
        """Check the fingerprint; when some chain is still to run, build the world (cached) and score its
        corpus (cached). Returns the control's matched weight (None when every chain is recorded)."""
        fingerprint = self.check_fingerprint()
        if all(self.has(arm, s) for arm in arms for s in seeds):
            return self.record().get("lr_control_factor")
        build(self.world, world_config(self.seed, self.kind))
        self.check_fingerprint()
        subprocess.run(stages_command([stage("pipelines.score", out=self.scores, executor="local", overwrite=True)]),
                       check=True, stdout=subprocess.DEVNULL, env=self.env)
        weight = mean_stored_weight(self.scores)
        with self.lock:
            rec = self.record()
            built = json.loads((self.world / "world.json").read_text())
            scoring = json.loads((self.scores / "summary.json").read_text())
            rec.update({"world": self.kind, "draw": self.seed, "built_with": built.get("built_with", fingerprint),
                        "world_build": {"corpus_rows": built["corpus_rows"],
                                        "behavior_accuracy": round(built["behavior_accuracy"], 4)},
                        "lr_control_factor": weight,
                        "weights_by_style": weights_by_style(self.scores, [a for a in ARMS if ARMS[a]
                                                                           and a != "pear-live"]),
                        "scoring": {v: {k: x[k] for k in ("share_at_delta_clip", "share_at_log_weight_clip",
                                                          "ess_tokens_fraction", "ess_sequences_fraction",
                                                          "weight_mean")}
                                    for v, x in scoring.get("variants", {}).items()}})
            rec.setdefault("arms", {})
            write_record(self.record_path, rec)
        return weight

    def ready(self, arms: list[str], seeds: list[int]) -> float | None:
        """`prepare`, once per set of arms, one draw at a time in this process (a build sets torch's
        process-wide thread count); returns the control's matched weight."""
        with PREPARING:
            if self.prepared is None or not set(arms) <= self.prepared[0]:
                self.prepared = (frozenset(arms), self.prepare(arms, seeds))
            return self.prepared[1]

    def run_arm(self, arm: str, seed: int, recipe: dict, matched_weight: float, env: dict) -> None:
        """SFT (unless no-sft) -> RL with snapshots -> evaluation of the SFT model, each snapshot and the
        RL model, on the same held-out prompts, in one process (run.log beside them); then its record
        and the deletion of its models. A chain already in the record is not run again."""
        if self.has(arm, seed):
            return
        d = self.root / arm / f"seed{seed}"
        env = {**env, **self.env}
        start = self.world / "target" if ARMS[arm] is None else d / "sft"
        todo = [] if ARMS[arm] is None else [
            (stage("train.sft", "sft", scores=self.scores, out=start, progress=False, seed=seed,
                   **sft_settings(arm, recipe, matched_weight)), d / "sft" / "train_summary.json")]
        todo.append((stage("train.rl", "rl", model=start, out=d / "rl", progress=False, seed=seed,
                           **recipe["rl"]), d / "rl" / "rl_summary.json"))
        steps = curve_steps(recipe)
        ev = {**recipe["eval"], "exclude": str(self.world / "corpus-unfiltered.parquet"), "seed": seed}
        models = {0: start, steps[-1]: d / "rl"}
        for step in steps:
            model = models.get(step, d / "rl" / "snapshots" / f"step-{step:06d}")
            extra = ({"baseline": eval_dir(d, 0, steps[-1])} if step == steps[-1]
                     else recipe["curve_eval"] if step else {})
            out = eval_dir(d, step, steps[-1])
            todo.append((stage("train.eval", "eval", model=model, out=out, progress=False, **{**ev, **extra}),
                         out / "eval.json"))
        stages(todo, d / "run.log", env)
        chain = chain_record(d, steps, ARMS[arm] is not None)
        with self.lock:
            rec = self.record()
            keys = chain.pop("prompts")
            chain = aligned(chain, rec.setdefault("prompts", keys), keys)
            rec.setdefault("arms", {}).setdefault(arm, {})[f"seed{seed}"] = chain
            write_record(self.record_path, rec)
        prune(d)


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

def run_chains(draws: list[Draw], arms: list[str], seeds: list[int], recipe: dict, jobs: int, t0: float) -> None:
    """Every (draw, arm, seed) chain not yet recorded, `jobs` at once, each on its own core and one
    thread (tiny models gain nothing from a second thread, and two chains keep both cores busy). Draw
    by draw: a chain's draw is built and scored when its first chain starts, so a stopped run leaves
    whole draws rather than built worlds with nothing run on them."""
    cores = queue.Queue()
    for i in range(jobs):
        cores.put(i % (os.cpu_count() or 1))

    def chain(d: Draw, arm: str, seed: int) -> None:
        core = cores.get()  # each running chain keeps to its own core (vLLM binds its threads)
        try:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            d.run_arm(arm, seed, recipe, d.ready(arms, seeds), env)
        finally:
            cores.put(core)

    chains = [(d, arm, seed) for d in draws for seed in seeds for arm in arms if not d.has(arm, seed)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(chain, *c): c for c in chains}
        for fut, (d, arm, seed) in futures.items():
            fut.result()
            log.info("world %d arm %s seed %d complete (%.0f min so far)", d.seed, arm, seed, (time.time() - t0) / 60)


@dataclass
class ExperimentConfig:
    """The PEAR experiment: the gate arms, the gate, then the PEAR arms."""

    world: str = field("", f"the kind of world, one of {', '.join(WORLDS)}; empty: PEAR_WORLD (make's WORLD), "
                           "else sft-matters (embedded with --smoke)")
    worlds: str = field("", "world draws (seeds), comma-separated; empty: the world's confirmation draws "
                            "(CONFIRMATION_DRAWS; 0,1,2 for a world without them, 0 with --smoke). A draw among "
                            "the world's selection draws is refused")
    seeds: int = field(1, "SFT and RL seeds per world draw")
    out: str = field("", "run folder (models, logs; best outside the repository); empty: runs/experiment/<world>, "
                         "or runs/experiment-smoke with --smoke")
    results: str = field("", "report folder, with the draws' records in experiment-draws/; empty: results/ for "
                             "sft-matters, results/<world>/ for another, the run folder for --smoke")
    smoke: bool = field(False, "one draw, a few steps: checks that the outputs are complete")
    jobs: int = field(2, "arm-seed chains run at once (each on one CPU thread)")
    arms: str = field(",".join(DEFAULT_ARMS), f"comma-separated arms among {', '.join(ARMS)} "
                                              f"({', '.join(GATE_ARMS)}, the gate arms, among them)")
    pear_arms: str = field("", "if-gate-holds: run the arms other than the gate arms only where the gate holds; "
                               "always: in any world; empty: if-gate-holds, always with --smoke (whose few "
                               "steps decide nothing)")

    def __post_init__(self):  # before any work: one line, exit code 2
        if self.world and self.world not in WORLDS:
            raise ConfigError(f"--world {self.world}: not a world; the worlds are {', '.join(WORLDS)}")
        if self.pear_arms and self.pear_arms not in PEAR_ARMS:
            raise ConfigError(f"--pear-arms {self.pear_arms}: one of {', '.join(PEAR_ARMS)}")
        arms = self.arm_list()
        if set(arms) - set(ARMS) or not set(GATE_ARMS) <= set(arms):
            raise ConfigError(f"--arms {self.arms}: arms among {', '.join(ARMS)}, {', '.join(GATE_ARMS)} included")
        try:
            seeds = [int(x) for x in self.worlds.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--worlds {self.worlds}: comma-separated integers") from None
        if self.world:
            used = sorted(set(seeds) & set(SELECTION_DRAWS.get(self.world, ())))
            if used and not self.smoke:
                raise ConfigError(f"--worlds {self.worlds}: draw(s) {used} chose the {self.world} world (selection "
                                  "draws); a confirmation counts fresh draws only")

    def arm_list(self) -> list[str]:
        return [x.strip() for x in self.arms.split(",") if x.strip()]

    def world_seeds(self, kind: str) -> list[int]:
        if self.worlds:
            seeds = [int(x) for x in self.worlds.split(",") if x.strip()]
        else:
            seeds = [0] if self.smoke else list(CONFIRMATION_DRAWS.get(kind, (0, 1, 2)))
        used = sorted(set(seeds) & set(SELECTION_DRAWS.get(kind, ())))
        if used and not self.smoke:
            raise ConfigError(f"--worlds {self.worlds}: draw(s) {used} chose the {kind} world (selection draws); "
                              "a confirmation counts fresh draws only")
        return seeds

    def kind(self) -> str:
        """The kind of world: --world, else PEAR_WORLD (read when the experiment starts), else the default."""
        kind = self.world or os.environ.get("PEAR_WORLD") or ("embedded" if self.smoke else "sft-matters")
        if kind not in WORLDS:
            raise ConfigError(f"PEAR_WORLD={kind} is not a world; the worlds are {', '.join(WORLDS)}")
        return kind


def run(cfg: ExperimentConfig) -> Path:
    """Every stage (each cached, each chain recorded), then the report; returns the report's folder."""
    arms = cfg.arm_list()
    kind = cfg.kind()
    worlds = cfg.world_seeds(kind)
    t0 = time.time()
    seeds = list(range(cfg.seeds))
    recipe = SMOKE if cfg.smoke else RECIPE
    root = Path(cfg.out or ("runs/experiment-smoke" if cfg.smoke else f"runs/experiment/{kind}"))
    results = Path(cfg.results or (root if cfg.smoke else "results" if kind == "sft-matters" else f"results/{kind}"))
    console.quiet(root / "experiment.log")
    draws = [Draw(kind, w, root, results / "experiment-draws") for w in worlds]
    for d in draws:  # before anything runs: no draw of another machine's build is mixed in
        d.check_fingerprint()

    # 1. the gate arms on every draw (each world built and scored as its first chain starts), then the gate
    run_chains(draws, list(GATE_ARMS), seeds, recipe, cfg.jobs, t0)
    gate, reference = gate_check({d.seed: d.record() for d in draws}, seeds, recipe)
    log.info("gate: %s (oracle minus uniform %.3f [%.3f, %.3f])", gate["holds"], gate["diff"], gate["lo"], gate["hi"])

    # 2. the PEAR arms where the gate holds
    if not gate["holds"] and (cfg.pear_arms or ("always" if cfg.smoke else "if-gate-holds")) == "if-gate-holds":
        log.info("the PEAR arms are not run: the oracle does not beat uniform SFT after RL in this world")
        arms = list(GATE_ARMS)
    others = [x for x in arms if x not in GATE_ARMS]
    run_chains(draws, [a for a in (PRIMARY, "lr-control") if a in others], seeds, recipe, cfg.jobs, t0)
    run_chains(draws, others, seeds, recipe, cfg.jobs, t0)
    arms = [x for x in ARMS if x in arms]  # the report's order

    # 3. the report, from the records alone
    write_report({d.seed: d.record() for d in draws}, kind, seeds, arms, recipe, results, {
        "command": "make experiment-smoke" if cfg.smoke else "make experiment",
        "minutes": round((time.time() - t0) / 60, 1)})
    return results


def write_report(records: dict[int, dict], kind: str, seeds: list[int], arms: list[str], recipe: dict,
                 results: Path, meta: dict) -> dict:
    """experiment.json, experiment.md and the plots in `results`, from the draws' records; checked complete."""
    from pipelines.experiment_report import check_complete, markdown, plots

    ks = [int(k) for k in setting(recipe, "eval", "k").split(",")]
    gate, reference = gate_check(records, seeds, recipe)
    res = collect(records, seeds, arms, recipe, ks)
    results.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "world": kind, "world_settings": WORLDS[kind], "seeds": len(seeds), "machine": machine(),
            "arms": arms, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "samples_per_prompt": int(setting(recipe, "eval", "n")),
            "curve_samples_per_prompt": int(setting(recipe, "curve_eval", "n")),
            "lr_control_factor": {str(w): r.get("lr_control_factor") for w, r in records.items()},
            "world_builds": {str(w): {**r["world_build"], "built_with": r["built_with"]} for w, r in records.items()}}
    report = {"meta": meta, "worlds": list(records), "selection_worlds": list(SELECTION_DRAWS.get(kind, ())),
              **headline(res), "gate": gate, "sft_matters": reference, "decision_rule": DECISION,
              "recipe": recipe,
              "recipe_files": {k: recipe_settings(k) for k in STAGES},
              "recipe_steps": int(setting(recipe, "rl", "steps")), **res}
    (results / "experiment.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "experiment.md").write_text(markdown(report, ks))
    plots(report, ks, results)
    check_complete(results, list(records), seeds, ks)
    return report


def main(argv=None) -> int:
    setup_logging()
    # the report on the terminal is experiment.md itself
    return cli(ExperimentConfig, argv, __doc__, run, lambda results: (results / "experiment.md").read_text(),
               errors=(FingerprintError,))


if __name__ == "__main__":
    sys.exit(main())
