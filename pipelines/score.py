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
from scorer.config import parse
from scorer.job import ConfigError, ScoreConfig, format_summary, run

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
    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"shards in {cfg.out}/  (polars: pl.read_parquet('{cfg.out}/*.parquet'))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
