"""`make score`: score a corpus; with no corpus given, the embedded demo's.

    python -m pipelines.score --data corpus.jsonl --target org/model [--behavior org/teacher] [--variant token]
    python -m pipelines.score                  # the embedded tiny world: built first (cached), then scored
    python -m pipelines.score --help           # every flag (scorer/config.py ScoreConfig)

With --data, the target is required and nothing of the embedded world is built, read or used: the
behavior comes from the corpus's behavior_logprobs column, or from --behavior. Prints the summary;
exit code 2 on bad input, with one line that says what is wrong.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from common.config import ConfigError, Stage, setup_logging
from scorer import job
from scorer.job import ScoreConfig
from scorer.shards import ShardError
from scorer.summary import format_summary


def embedded_defaults(cfg: ScoreConfig, world: Path) -> ScoreConfig:
    """The embedded world's corpus and models (under `world`) for the fields not given (only when
    --data is not)."""
    embedded = {"data": f"{world}/corpus.parquet", "target": f"{world}/target", "behavior": f"{world}/behavior"}
    return replace(cfg, **{name: value for name, value in embedded.items() if not getattr(cfg, name)})


def score(cfg: ScoreConfig) -> tuple[dict, str]:
    """Score `cfg.data`, or the embedded world's corpus (the world built first, cached); returns the
    summary and the output folder."""
    if not cfg.data:
        # imported here: a run with --data needs nothing of the world (its PEAR_WORLD* settings included)
        from pipelines.world import build, world_config, world_dir

        world = world_dir()
        build(world, world_config())
        cfg = embedded_defaults(cfg, world)
    elif not cfg.target:
        raise ConfigError("TARGET= (--target) is required with DATA=: the model to be trained, a folder or hub id")
    return job.run(cfg), cfg.out


def report(done: tuple[dict, str]) -> str:
    summary, out = done
    return f"{format_summary(summary)}\nshards in {out}/  (polars: pl.read_parquet('{out}/*.parquet'))"


STAGE = Stage(ScoreConfig, score, report, __doc__, errors=(ShardError,), log="score.log")


def main(argv=None) -> int:
    setup_logging()
    return STAGE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
