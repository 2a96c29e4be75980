"""`make experiment`: does PEAR-weighted SFT help the RL that follows, in a world where the SFT data's
weighting can change where RL ends?

    python -m pipelines.experiment                         # the sft-matters world, its confirmation draws
    python -m pipelines.experiment --world embedded        # the default world, where SFT does not matter after RL
    python -m pipelines.experiment --smoke                 # one draw of the embedded world, a few steps

Worlds. A world draw is one build of a kind of world (pipelines/world.py WORLDS) from one seed;
another seed, or another machine, builds another draw. Draws that were looked at while a world's
settings were chosen are its selection draws (SELECTION_DRAWS); the experiment runs on fresh
confirmation draws (CONFIRMATION_DRAWS), listed here, with the decision rule (DECISION), before any
of them ran. The intervals are t-intervals over the draws (pipelines/experiment_stats.py).

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
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import console
from common.config import ConfigError, cli, field, setup_logging
from pipelines.experiment_stats import area_under_curve, estimate, fieller, oracle_gate, sft_matters
from pipelines.recipes import RECIPES, STAGES, embedded_config, recipe_file, recipe_settings
from pipelines.stages import command as stages_command
from pipelines.world import STYLES, WORLDS, build, built_with, world_config, world_dir
from train.eval import pass_at_k, read_eval

log = logging.getLogger("pear.experiment")
MATCHED = "<lr x mean weight of pear-token>"  # resolved from each world's scored shards before its arms run
ORACLE_ONLY = "style=careful"  # the traces the target can carry out: its careful procedure (pipelines/world.py)
ARMS = {  # arm -> SFT flags (None: no SFT)
    "no-sft": None,
    "uniform": ["--weighting", "uniform"],
    "oracle": ["--weighting", "uniform", "--only", ORACLE_ONLY],
    "lr-control": ["--weighting", "uniform", "--lr", MATCHED],
    "pear-token": ["--weighting", "pear"],  # the weights stored by the scorer (token, the reported defaults)
    "pear-token-clip0.5": ["--weighting", "pear", "--variant", "token", "--delta-clip", "-0.5,0.3"],
    "pear-token-clip1.0": ["--weighting", "pear", "--variant", "token", "--delta-clip", "-1.0,0.3"],
    "pear-sequence": ["--weighting", "pear", "--variant", "sequence"],
    "pear-block": ["--weighting", "pear", "--variant", "block"],
    "pear-live": ["--weighting", "pear-live"],
}
GATE_ARMS = ("no-sft", "uniform", "oracle")
REFERENCES = GATE_ARMS  # the arms every run has
DEFAULT_ARMS = ("no-sft", "uniform", "oracle", "pear-token", "lr-control", "pear-token-clip0.5", "pear-token-clip1.0",
                "pear-sequence")
PRIMARY = "pear-token"  # the arm the decision rule is about (the paper's B = 1)
PEAR_ARMS = ("if-gate-holds", "always")  # when the arms other than the gate arms run
GATE_MARGIN = 0.10
SFT_MATTERS_MARGIN = 0.10  # no-sft minus uniform: reported, no longer deciding
# Draws looked at while a world's settings were chosen (results/world-selection.md) and the fresh draws
# that confirm, fixed before any of them ran. Another setting tried for the gate would turn its
# draws into selection draws too.
SELECTION_DRAWS = {"sft-matters": (0, 1, 2)}
CONFIRMATION_DRAWS = {"sft-matters": (3, 4, 5, 6, 7, 8, 9, 10)}
CURVE_STEPS = "10,25,50"  # RL steps with a snapshot to evaluate, besides 0 and the last
# RL: 100 steps. Uniform gained 0.016 between steps 100 and 150 in the earlier report (0.315 -> 0.331)
# while every arm had made most of its gain by step 100: the time goes to more draws instead.
RL_STEPS = "100"
# The one recipe: the embedded recipes of `make sft`, `make rl`, `make eval` (their YAML files),
# one CPU thread per stage (two chains share the 2 cores), then what --smoke changes.
SFT_RECIPE, RL_RECIPE, EVAL_RECIPE = (embedded_config(s, []) for s in STAGES)
RECIPE = {
    "sft": SFT_RECIPE,
    "rl": RL_RECIPE + ["--steps", RL_STEPS, "--save-every", "50", "--threads", "1", "--snapshot-steps", CURVE_STEPS],
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
Written before any confirmation draw ran (pipelines/experiment.py DECISION), and applied as written:

1. Draws. The world's selection draws (sft-matters: {", ".join(map(str, SELECTION_DRAWS["sft-matters"]))})
   were looked at while its settings were chosen; they count in no comparison below. The
   confirmation draws (sft-matters: {", ".join(map(str, CONFIRMATION_DRAWS["sft-matters"]))}) are fresh builds,
   listed in the code before any of them ran. Every interval is a 95% t-interval on the per-draw
   paired means, n - 1 degrees of freedom; the minimum detectable difference is
   (t(0.975, n - 1) + z(0.8)) standard errors.
2. The gate, before any PEAR arm runs: can weighting the SFT data change where RL ends here? The
   oracle (uniform SFT on only the corpus traces the target can carry out, {ORACLE_ONLY}) minus
   uniform SFT, held-out pass@1 after the last RL step, must be at least +{GATE_MARGIN:.2f} with the
   interval above 0. If it fails, no PEAR arm runs and the report says so and stops: that is the
   result. No-SFT minus uniform is reported as a reference and decides nothing.
3. The primary comparison: held-out pass@1 after the last RL step, {PRIMARY} minus uniform, paired by
   draw, seed and prompt. PEAR helps if the interval lies above 0, hurts if below 0, and neither
   otherwise (the minimum detectable difference then says how large an effect could have gone
   unseen). Beside it, the share of the oracle's gain that PEAR recovers, (pear - uniform) /
   (oracle - uniform), with Fieller's interval on n - 1 degrees of freedom.
4. Secondary, reported whatever they say and not deciding: PEAR token with the lower delta clip at
   -0.5 and -1.0, PEAR sequence, the learning-rate control (is a difference from PEAR's per-token
   shape or from its smaller average step?), the area under the pass@1 curve over RL steps and
   pass@16 after RL. No correction for the number of secondary comparisons: read them as such."""


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
        subprocess.run([sys.executable, "-m", "pipelines.score", "--out", str(self.scores), "--executor", "local",
                        "--overwrite", "true"], check=True, stdout=subprocess.DEVNULL, env=self.env)
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
            todo.append((["train.eval", "--model", model, "--out", str(out), *ev, *extra], out / "eval.json"))
        stages(todo, d / "run.log", env)
        chain = chain_record(d, steps, ARMS[arm] is not None)
        with self.lock:
            rec = self.record()
            keys = chain.pop("prompts")
            chain = aligned(chain, rec.setdefault("prompts", keys), keys)
            rec.setdefault("arms", {}).setdefault(arm, {})[f"seed{seed}"] = chain
            write_record(self.record_path, rec)
        prune(d)


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

    flags = ARMS[arm] or []
    if "pear" not in flags:
        return None
    params = WeightParams.from_dict(stored)
    if "--variant" in flags:
        params = WeightParams(flags[flags.index("--variant") + 1], params.gamma, params.block_size,
                              tuple(float(x) for x in flags[flags.index("--delta-clip") + 1].split(","))
                              if "--delta-clip" in flags else params.delta_clip, params.log_weight_clip)
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
            on = np.ones(len(token_style)) if "--only" not in ARMS[arm] else \
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

    ks = [int(k) for k in setting(recipe["eval"], "k").split(",")]
    gate, reference = gate_check(records, seeds, recipe)
    res = collect(records, seeds, arms, recipe, ks)
    results.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "world": kind, "world_settings": WORLDS[kind], "seeds": len(seeds), "machine": machine(),
            "arms": arms, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
            "samples_per_prompt": int(setting(recipe["eval"], "n")),
            "curve_samples_per_prompt": int(setting(recipe["curve_eval"], "n")),
            "lr_control_factor": {str(w): r.get("lr_control_factor") for w, r in records.items()},
            "world_builds": {str(w): {**r["world_build"], "built_with": r["built_with"]} for w, r in records.items()}}
    report = {"meta": meta, "worlds": list(records), "selection_worlds": list(SELECTION_DRAWS.get(kind, ())),
              **headline(res), "gate": gate, "sft_matters": reference, "decision_rule": DECISION,
              "recipe": {k: shown(v) for k, v in recipe.items()},
              "recipe_files": {k: recipe_settings(k) for k in STAGES},
              "recipe_steps": int(setting(recipe["rl"], "steps")), **res}
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
