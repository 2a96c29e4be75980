"""The embedded world's recipes: one YAML file per stage under recipes/.

    recipes/embedded-sft.yaml    train.sft   (make sft)
    recipes/embedded-rl.yaml     train.rl    (make rl)
    recipes/embedded-eval.yaml   train.eval  (make eval)

A model of the embedded world gets its stage's recipe beneath the settings given (`with_recipe`:
the one way, for make, the demo and the experiment alike): flags and settings given win over it,
and a user's own `--config` replaces it. What depends on the world's seed (the evaluation's
`--exclude` of the unfiltered corpus) cannot be written in a file and is added in code.
"""
from __future__ import annotations

from pathlib import Path

from common.config import beneath

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


def with_recipe(cfg, stage: str, given: set[str]):
    """`cfg` with the embedded recipe of `stage` beneath the settings `given` (common/config.py
    `parse_given` names them); a recipe file of the user's ("config" given) replaces it."""
    return cfg if "config" in given else beneath(cfg, recipe_settings(stage), given)
