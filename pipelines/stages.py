"""Several stages, one after another, in one process:

    python -m pipelines.stages '["== a title", {"stage": "train.eval", "settings": {"model": "A", "out": "a"}}]'

A string is a line for the terminal, printed before the stages after it run. A stage is named by
its module (whose `STAGE` runs it; `module:NAME` for another attribute) and gets its settings as a
config object would hold them (field names, values as YAML gives them), over its defaults. The
experiment runs each arm's SFT, RL and evaluations this way, and the demo every stage after
scoring: one Python, torch and vLLM start-up instead of one per stage. Each stage starts with the
thread count a new process has, seeds itself and builds its own engine, so it computes what it
would in a process of its own (their models and samples are byte-identical either way). Stops at
the first stage that fails, with its exit code.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

from common import console
from common.config import Stage, setup_logging
from pipelines.recipes import with_recipe


def stage(name: str, recipe: str | None = None, /, **settings) -> dict:
    """One item of a plan: stage `name` (a module, or `module:NAME`) with `settings`, over the embedded
    recipe of stage `recipe` (sft, rl, eval; pipelines/recipes.py) if one is named."""
    settings = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    return {"stage": name, "settings": settings, **({"recipe": recipe} if recipe else {})}


def command(items: list) -> list[str]:
    """The command line of a child process that runs `items` (titles and stages) one after another."""
    return [sys.executable, "-m", "pipelines.stages", json.dumps(items)]


def find(name: str) -> Stage:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr or "STAGE")


def recipe_beneath(stage: str):
    """`cfg, given -> cfg` with the embedded recipe of `stage` beneath the settings given."""
    return lambda cfg, given: with_recipe(cfg, stage, given)


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()  # each stage starts with the threads a new process has
    for item in json.loads((sys.argv[1:] if argv is None else argv)[0]):
        if isinstance(item, str):
            print(item, file=console.out(), flush=True)
            continue
        torch.set_num_threads(threads)
        rc = find(item["stage"]).run(item["settings"], recipe_beneath(item["recipe"]) if item.get("recipe") else None)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
