"""The embedded world's recipes: one YAML file per stage under recipes/, taken by `--config`.

    recipes/embedded-sft.yaml    train.sft   (make sft)
    recipes/embedded-rl.yaml     train.rl    (make rl)
    recipes/embedded-eval.yaml   train.eval  (make eval)

A model of the embedded world gets its stage's file as `--config`: flags given on the command line
win over it, and a user's own `--config` replaces it. What depends on the world's seed (the
evaluation's `--exclude` of the unfiltered corpus) cannot be written in a file and is added in code.
"""
from __future__ import annotations

from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # in the repository, beside pipelines/
STAGES = ("sft", "rl", "eval")


def recipe_file(stage: str) -> Path:
    """The embedded recipe of `stage` (sft, rl or eval)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return RECIPES / f"embedded-{stage}.yaml"


def recipe_settings(stage: str) -> dict:
    """The settings of the embedded recipe of `stage`, as its YAML file holds them."""
    import yaml

    return yaml.safe_load(recipe_file(stage).read_text()) or {}


def gave(argv, flag: str) -> bool:
    """Does the argument list give `flag` (`--flag value` or `--flag=value`)?"""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def embedded_config(stage: str, argv) -> list[str]:
    """`--config <the stage's recipe>`, to go before `argv` (so that its flags win), unless `argv` names
    its own --config: a user's recipe replaces the embedded one."""
    return [] if gave(argv, "--config") else ["--config", str(recipe_file(stage))]
