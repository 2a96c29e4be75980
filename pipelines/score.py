"""`make score`: build the embedded world when it is what is asked for, then run the scoring job.

    python -m pipelines.score [--data corpus] [--out runs/score] [any scorer.job flag]

With no --data (or the embedded defaults) the embedded tiny world is built first (cached).
Prints the summary; exit code 2 on bad input, with one line that says what is wrong.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipelines.world import WorldConfig, build
from scorer import job
from scorer.config import parse
from scorer.job import ScoreConfig

WORLD = Path("artifacts/world")


def uses_world(cfg: ScoreConfig) -> bool:
    """Does the run read anything from the embedded world folder?"""
    paths = [cfg.data, cfg.target, cfg.behavior]
    return any(Path(p).resolve().is_relative_to(WORLD.resolve()) for p in paths if p and p != "none")


def main(argv=None) -> int:
    cfg = parse(ScoreConfig, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if uses_world(cfg):
        build(WORLD, WorldConfig())
    rc = job.main(argv)
    if rc == 0:
        print(f"shards in {cfg.out}/  (polars: pl.read_parquet('{cfg.out}/*.parquet'))")
    return rc


if __name__ == "__main__":
    sys.exit(main())
