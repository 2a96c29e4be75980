"""`make rl` and `make eval`: build what the embedded default needs, then run the stage.

    python -m pipelines.rl rl   [--model runs/sft/pear] [--out runs/rl/pear] [any train.rl flag]
    python -m pipelines.rl eval [--model runs/rl/pear] [--out runs/eval/pear] [any train.eval flag]

rl: with the default model (runs/sft/pear) missing, the embedded world is built (cached) and the
PEAR SFT checkpoint is made first by `python -m pipelines.sft`. A model descended from the
embedded world (its target, an SFT run of it, an RL run of those; wherever its folder is) gets the
embedded recipe, recipes/embedded-rl.yaml (flags override it, a --config YAML replaces it).
eval: with the default model (runs/rl/pear) missing, the default RL run is made first; an embedded
model gets recipes/embedded-eval.yaml (400 prompts before the held-out check, 16 samples each)
and, recipe or not, the world's unfiltered corpus as an --exclude.
The stages' default prompts (reasoning-gym chain_sum with 1-digit terms, 64 new tokens) are the
embedded world's: for any other model, rl and eval stop unless --prompts or --tasks is given.
Exit code 2 on bad input, with one line that says what is wrong.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from common import console
from common.config import ConfigError, Stage, setup_logging
from common.models import resolve_model
from pipelines.recipes import recipe_file, with_recipe
from pipelines.stages import command as stages_command
from pipelines.stages import stage
from pipelines.world import build, world_config, world_dir
from train import eval as evaluation
from train import rl

log = logging.getLogger("pear.pipelines")
WORLD = world_dir()
SFT_TIMEOUT_S = 3600  # scoring + two SFT runs take minutes on 2 cores; an hour means something hangs


def world_exclude() -> tuple[str, ...]:
    """The evaluation's exclude of the embedded world's unfiltered corpus: its folder depends on
    WORLD_SEED, so it cannot be written in recipes/embedded-eval.yaml."""
    return (str(WORLD / "corpus-unfiltered.parquet"),)


def from_world(model: str) -> bool:
    """Is `model` the embedded target, or descended from it (SFT and RL runs record their start)?"""
    folder, world = Path(model).resolve(), WORLD.resolve()
    for _ in range(4):  # RL -> SFT -> target: a short chain, bounded against loops
        if folder.is_relative_to(world):
            return True
        summaries = [folder / "train_summary.json", folder / "rl_summary.json"]
        start = next((json.loads(f.read_text()).get("model", "") for f in summaries if f.exists()), "")
        if not start:
            return False
        folder = Path(start).resolve()
    return False


def gave_prompts(given: set[str]) -> bool:
    """Do the settings given (flags, or the user's YAML, flat or under `prompt_set:`) name the prompts?"""
    return bool({"prompts", "tasks"} & given)


def refuse_world_prompts(model: str) -> int:
    """A model outside the embedded world with no prompts named: one line, exit 2 (a model that is
    not there is named first)."""
    try:
        resolve_model(model)
        message = (f"{model} does not descend from the embedded world: name its prompts with --prompts (PROMPTS=: "
                   "a file, folder or hub dataset of prompts and answers) or --tasks (TASKS=: reasoning-gym task "
                   "names); the default prompts (chain_sum with 1-digit terms) are the embedded world's")
    except ConfigError as e:
        message = str(e)
    print(f"error: {message}", file=console.err())
    console.discard_log()  # refused here, not in the stage's own entry: no output folder, no log
    return 2


def ensure_sft_model(model: str) -> str:
    """The starting model for RL: `model` when it exists; the default one is built when missing."""
    if (Path(model) / "config.json").exists() or Path(model) != Path(rl.RLConfig.model):
        return model
    build(WORLD, world_config())
    log.info("%s is missing: making the embedded scores and SFT checkpoints first (make sft)", model)
    # a child process: the scoring's in-process vLLM engine pins the CPU threads that RL needs next
    subprocess.run(stages_command([stage("pipelines.sft")]), check=True, timeout=SFT_TIMEOUT_S,
                   **console.child_streams())
    if not (Path(model) / "config.json").exists():
        raise FileNotFoundError(f"make sft finished but wrote no model at {model}")
    return model


def run_rl(cfg: rl.RLConfig, given: set[str]) -> int:
    """RL from `cfg.model` (the default made first when missing), with the embedded recipe beneath
    the settings given for a model of the embedded world."""
    console.quiet(Path(cfg.out) / "rl.log")
    if Path(cfg.model).resolve().is_relative_to(WORLD.resolve()):
        build(WORLD, world_config())
    try:
        model = ensure_sft_model(cfg.model)
    except (FileNotFoundError, subprocess.SubprocessError) as e:
        print(f"error: could not make the starting model: {e}", file=console.err())
        console.discard_log()
        return 2
    embedded = from_world(model)
    if not embedded and not gave_prompts(given):
        return refuse_world_prompts(model)
    if embedded:
        log.info("embedded model: recipe %s", recipe_file("rl"))
        cfg = with_recipe(cfg, "rl", given)
    return rl.STAGE.call(replace(cfg, model=model), given)


def run_eval(cfg: evaluation.EvalConfig, given: set[str]) -> int:
    """Evaluation of `cfg.model` (the default RL run made first when missing), with the embedded
    recipe beneath the settings given, and the world's corpus excluded, for a model of the world."""
    console.quiet(Path(cfg.out) / "eval.log")
    if not (Path(cfg.model) / "config.json").exists() and Path(cfg.model) == Path(evaluation.EvalConfig.model):
        log.info("%s is missing: running the default RL first", cfg.model)
        rc = RL.run({"out": cfg.model})
        if rc:
            return rc
    # nothing of the world is built or read for a model that does not descend from it
    if not from_world(cfg.model):
        return evaluation.STAGE.call(cfg, given) if gave_prompts(given) else refuse_world_prompts(cfg.model)
    build(WORLD, world_config())  # the held-out check reads the world's unfiltered corpus
    cfg = with_recipe(cfg, "eval", given)
    if "exclude" not in given:
        cfg = replace(cfg, exclude=world_exclude())
    return evaluation.STAGE.call(cfg, given)


# the stage's exit code is the trainer's, which has printed its report
RL = Stage(rl.RLConfig, run_rl, lambda rc: None, rl.__doc__, takes_given=True, status=lambda rc: rc)
EVAL = Stage(evaluation.EvalConfig, run_eval, lambda rc: None, evaluation.__doc__, takes_given=True,
             status=lambda rc: rc)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv or argv[0] not in ("rl", "eval"):
        print("usage: python -m pipelines.rl {rl,eval} [flags]  (see --help of each)", file=console.err())
        return 2
    return (RL if argv[0] == "rl" else EVAL).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
