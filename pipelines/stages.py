"""Several stages' command lines, one after another, in one process:

    python -m pipelines.stages '["== a title", ["train.eval", "--model", "A", "--out", "a"], ["train.eval", ...]]'

A string is a line for the terminal, printed before the stages after it run. The experiment runs
each arm's SFT, RL and evaluations this way, and the demo every stage after scoring: one Python,
torch and vLLM start-up instead of one per stage. Each stage starts with the thread count a new
process has, seeds itself and builds its own engine, so it computes what it would in a process of
its own (their models and samples are byte-identical either way). Stops at the first stage that
fails, with its exit code.
"""
from __future__ import annotations

import importlib
import json
import sys

from common import console
from common.config import setup_logging


def command(items: list) -> list[str]:
    """The command line of a child process that runs `items` (titles and stages) one after another."""
    return [sys.executable, "-m", "pipelines.stages", json.dumps(items)]


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()  # each stage starts with the threads a new process has
    for item in json.loads((sys.argv[1:] if argv is None else argv)[0]):
        if isinstance(item, str):
            print(item, file=console.out(), flush=True)
            continue
        module, *args = item
        torch.set_num_threads(threads)
        rc = importlib.import_module(module).main(args)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
