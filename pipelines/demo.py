"""`make demo`: the whole pipeline on the embedded default, from nothing.

    python -m pipelines.demo

Builds the embedded world (cached), scores its corpus into runs/score and prints the summary.
"""
from __future__ import annotations

import logging
import sys
import time

from pipelines import score


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    print("== score: runs/score (embedded corpus, target and behavior models)")
    rc = score.main(["--out", "runs/score"])
    if rc:
        return rc
    print(f"== demo done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
