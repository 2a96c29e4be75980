"""Several stages' command lines, one after another, in one process:

    python -m pipelines.stages '[["train.eval", "--model", "A", "--out", "a"], ["train.eval", ...]]'

The experiment evaluates each arm's models this way, and the demo both arms' models before RL,
then after RL: one Python, torch and vLLM start-up instead of one each. Each stage still builds
its own engine from its own seed, so its samples are those it draws in a process of its own.
Stops at the first stage that fails, with its exit code.
"""
from __future__ import annotations

import importlib
import json
import sys

from common.config import setup_logging


def main(argv=None) -> int:
    for module, *args in json.loads((sys.argv[1:] if argv is None else argv)[0]):
        rc = importlib.import_module(module).main(args)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
