"""The scoring job: corpus -> tokenize -> target (and behavior) logprobs -> PEAR weights -> shards.

    python -m pipelines.score --data corpus.parquet --target org/model --out runs/score [--variant token]

    from scorer.job import ScoreConfig, run
    summary = run(ScoreConfig(data="corpus.parquet", target="org/model", out="runs/score"))

The corpus is cut into units of `rows_per_shard` rows of one input file; each unit becomes one
shard, written atomically, so a rerun of the same command scores only the units whose shard is
missing. Units are spread over an actor pool with Ray Data: each actor loads its engines once in
`__init__` and scores whole units in `__call__`. `RAY_ADDRESS` points the job at a cluster; without
it a local Ray instance starts.

The steps, one module each: scorer/plan.py (checks and units), scorer/resume.py (what a rerun
keeps), scorer/execute.py (Ray or this process), scorer/unit.py (one unit, one shard),
scorer/passthrough.py (the corpus's other columns), scorer/summary.py (summary.json, history.jsonl).
"""
from __future__ import annotations

import logging
import sys
import time

from common.lock import locked
from common.storage import append_json_line, as_path, run_id, write_json_atomic
from scorer.config import ScoreConfig
from scorer.execute import execute
from scorer.plan import check_inputs
from scorer.resume import reconcile
from scorer.shards import remove_temporaries
from scorer.summary import run_record, summarize

__all__ = ["ScoreConfig", "run"]

log = logging.getLogger("pear.scorer")


def run(cfg: ScoreConfig, progress: bool = True) -> dict:
    """Score what is missing under `cfg.out`, then write the merged rejects and summary.json (the
    shards as they are, and the speed of the runs that made them) and append this run's line to
    history.jsonl (what it scored, in what time: a rerun that scores nothing is a line of its own and
    leaves the record of the runs before it). Returns the summary, with this run's line as `this_run`.
    OUT is locked for the whole job: a second job on it is refused at once."""
    # everything that can be refused, before any model or Ray instance loads
    sources, units, job_meta, passthrough = check_inputs(cfg)
    out = as_path(cfg.out)
    with locked(out):
        # the shards already there that this job keeps; the others' units are scored
        (out / "rejects" / "parts").mkdir(parents=True, exist_ok=True)
        pending = reconcile(out, units, job_meta, cfg.overwrite)
        log.info("%d units, %d already scored, %d to score (backend %s, executor %s)",
                 len(units), len(units) - len(pending), len(pending), job_meta["backend"], cfg.executor)

        # score them
        name, t0 = run_id(), time.perf_counter()
        results = execute(cfg, pending, job_meta, passthrough, progress, name, t0) if pending else []
        remove_temporaries(out)  # of writers killed mid-write (a lost actor); no other writer holds OUT

        # this run's line, then the summary of the shards as they are
        this_run = run_record(cfg, name, len(units), results, time.perf_counter() - t0, job_meta)
        append_json_line(this_run, out / "history.jsonl")
        summary = summarize(cfg, out, units, job_meta, sources)
        write_json_atomic(summary, out / "summary.json")
    return {**summary, "this_run": this_run}


if __name__ == "__main__":
    # the scoring command line is pipelines.score; an old script calling this module must not pass silently
    print("error: python -m scorer.job is no longer a command; run python -m pipelines.score (same flags)",
          file=sys.stderr)
    sys.exit(2)
