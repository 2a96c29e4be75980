"""`make sft`: score the embedded corpus when needed, then weighted SFT once per weighting.

    python -m pipelines.sft [--scores runs/score] [--out runs/sft] [--weighting uniform,pear] [train.sft flags]

Default: plain SFT (uniform) then PEAR on the same tokens, the same batches and the same held-out
rows, each into `out/<weighting>/`, then a table of final loss and held-out NLL side by side.
With a single weighting the model folder is `out` itself. Every other flag is train.sft's
(e.g. --epochs 2 --lr 1e-4 --variant block --model path). Exit code 2 on bad input.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import console
from common.config import ConfigError, Stage, field, setup_logging
from common.storage import as_path
from pipelines.recipes import with_recipe
from pipelines.stages import command as stages_command
from pipelines.stages import stage
from pipelines.world import world_dir
from scorer.shards import ShardError, list_shards, read_meta
from scorer.weights import WeightParams
from train import sft

log = logging.getLogger("pear.pipelines")
WORLD = world_dir()  # built by pipelines.score when needed
DEFAULT_SCORES = "runs/score"


@dataclass
class SFTRunsConfig(sft.SFTConfig):
    """Weighted SFT from scored shards, once per weighting."""

    weighting: str = field("uniform,pear", "comma-separated, one run each: uniform (plain SFT), pear (stored "
                                           "weights), pear-live (current-model delta)")


def ensure_scores(scores: str) -> None:
    """The default folder: run `pipelines.score` (builds the world and scores only what is missing;
    nothing when all is cached), keeping the weighting its shards already have (a `reweight` is
    not undone). Another folder must already hold shards."""
    if Path(scores) != Path(DEFAULT_SCORES):
        if not (as_path(scores).is_dir() and list_shards(scores)):  # a local folder or an object-storage URI
            raise FileNotFoundError(f"no shards in {scores}; run `make score OUT={scores}` first")
        return
    shards = list_shards(scores) if Path(scores).is_dir() else []
    weighting = {}
    if shards:
        meta = read_meta(shards[0])
        if not uses_world(meta):
            return  # the user's own scores in the default folder: nothing of the world is needed
        weighting = {k: v for k, v in meta.items() if k in WeightParams().as_dict()}
    log.info("making sure %s holds the scored embedded corpus", scores)
    # a child process: an in-process vLLM engine pins the CPU threads that training needs next
    streams = console.child_streams()
    if shards:  # a check of shards made before: their summary was shown then (runs/score/summary.json)
        streams["stdout"] = subprocess.DEVNULL
    subprocess.run(stages_command([stage("pipelines.score", out=scores, executor="local", **weighting)]),
                   **streams, check=True)


def uses_world(meta: dict) -> bool:
    """Were these shards scored against the embedded target?"""
    target = meta.get("target_model", {}).get("path", "")
    return bool(target) and Path(target).resolve().is_relative_to(WORLD.resolve())


def format_table(summaries: list[dict]) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [f"{'weighting':10} {'steps':>5} {'final loss':>10} {'last epoch':>10} {'held-out NLL':>17} "
             f"{'mean w':>7} {'ESS':>6} {'train s':>7}"]
    for s in summaries:
        lines.append(f"{s['weighting']:10} {s['steps']:5d} {f(s['final_loss']):>10} {f(s['last_epoch_loss']):>10} "
                     f"{f(s['heldout_nll_start']) + ' -> ' + f(s['heldout_nll']):>17} {s['mean_weight']:7.3f} "
                     f"{s['mean_ess_fraction']:6.1%} {s['loop_seconds']:7.1f}")
    lines.append("(loss and held-out NLL: plain mean NLL per response token, comparable across weightings; "
                 "ESS: mean per-step share of tokens)")
    return "\n".join(lines)


def train_arms(cfg: SFTRunsConfig, given: set[str]) -> list[dict]:
    """One train.sft run per weighting of `cfg.weighting`; returns their summaries. The embedded
    target (no --model, shards scored against it) gets recipes/embedded-sft.yaml beneath the
    settings given (a --config of the user's replaces it)."""
    arms = [w.strip() for w in cfg.weighting.split(",") if w.strip()]
    if not arms or any(w not in sft.WEIGHTINGS for w in arms):
        raise ConfigError(f"--weighting: comma-separated names of {sft.WEIGHTINGS}, got {cfg.weighting!r}")
    try:
        ensure_scores(cfg.scores)
    except (FileNotFoundError, ShardError, subprocess.CalledProcessError) as e:
        raise ConfigError(str(e)) from None
    if "model" not in given and uses_world(read_meta(list_shards(cfg.scores)[0])):
        cfg = with_recipe(cfg, "sft", given)
    summaries = []
    for arm in arms:
        out = Path(cfg.out) if len(arms) == 1 else Path(cfg.out) / arm
        console.quiet(out / "sft.log")
        run = sft.SFTConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(sft.SFTConfig)})
        summary = sft.run(dataclasses.replace(run, out=str(out), weighting=arm))
        print(sft.format_summary(summary), file=console.out())
        summaries.append(summary)
    return summaries


def report(summaries: list[dict]) -> str:
    return f"{format_table(summaries)}\nmodels in {', '.join(s['out'] for s in summaries)}"


STAGE = Stage(SFTRunsConfig, train_arms, report, __doc__, errors=(ShardError,), log="sft.log", takes_given=True)


def main(argv=None) -> int:
    setup_logging()
    return STAGE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
