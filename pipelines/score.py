"""`make score`: score a corpus; with no corpus given, the embedded demo's.

    python -m pipelines.score --data corpus.jsonl --target org/model [--behavior org/teacher] [scorer.job flags]
    python -m pipelines.score                  # the embedded tiny world: built first (cached), then scored

With --data, the target is required and nothing of the embedded world is built, read or used: the
behavior comes from the corpus's behavior_logprobs column, or from --behavior. Prints the summary;
exit code 2 on bad input, with one line that says what is wrong.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import console
from common.config import parse, setup_logging
from common.storage import local_file
from pipelines.world import build, world_config, world_dir
from scorer import job
from scorer.job import ScoreConfig

WORLD = str(world_dir())
EMBEDDED = {"data": f"{WORLD}/corpus.parquet", "target": f"{WORLD}/target", "behavior": f"{WORLD}/behavior"}


def embedded_defaults(argv: list[str]) -> list[str]:
    """The embedded world's corpus and models for the fields not given (only when --data is not)."""
    cfg = parse(ScoreConfig, argv)
    extra = []
    for name, value in EMBEDDED.items():
        if not getattr(cfg, name):
            extra += [f"--{name}", value]
    return extra + argv


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(ScoreConfig, argv, description=__doc__)
    setup_logging()
    console.quiet(local_file(cfg.out, "score.log"))  # OUT may be a URI: the log stays on this machine
    if not cfg.data:
        build(Path(WORLD), world_config())
        argv = embedded_defaults(argv)
    elif not cfg.target:
        print("error: TARGET= (--target) is required with DATA=: the model to be trained, a folder or hub id",
              file=console.err())
        return 2
    rc = job.main(argv)
    if rc == 0:
        print(f"shards in {cfg.out}/  (polars: pl.read_parquet('{cfg.out}/*.parquet'))", file=console.out())
    return rc


if __name__ == "__main__":
    sys.exit(main())
