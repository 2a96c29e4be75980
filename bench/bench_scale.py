"""Memory against corpus size: the scoring driver and the SFT data loader on 10k and 100k rows.

    python -m bench.bench_scale [--sizes 10000,100000] [--out runs/bench-scale]

A synthetic corpus of N rows is made from the embedded world's corpus (its rows repeated under new
ids, with their behavior logprobs, so no behavior model runs) and scored with the embedded target
(torch backend, in-process executor: the driver process does all the work, so its peak RSS is the
job's). Then one epoch of the SFT loader (`train.data.load_rows`, the plan, `collate` of every
micro-batch, read as the trainer reads them) runs over the shards. Each measurement runs in a
fresh process and reports its own peak resident memory (ru_maxrss). Printed: per size, peak RSS
and time; then the ratio of the largest size to the smallest (goal: at most 1.2). JSON goes to
$OUT/bench_scale.json, else bench/results/.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import cli, field
from pipelines.world import world_dir

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / world_dir()

# Each child writes its result to the file named by PEAR_BENCH_RESULT, not to stdout: a quiet stage
# (PEAR_QUIET=1, the Makefile's default) sends stdout to its log file.
SCORE = """
import json, os, resource, sys, time
from pipelines.score import main
t = time.perf_counter()
rc = main(sys.argv[1:])
json.dump({"rc": rc, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": time.perf_counter() - t},
          open(os.environ["PEAR_BENCH_RESULT"], "w"))
"""

LOAD = """
import json, os, resource, sys, time
import numpy as np
from train.data import collated, load_rows, plan_epoch
t = time.perf_counter()
rows, meta = load_rows(sys.argv[1], 1 << 20)
tokens = 0
for batch in collated(rows, plan_epoch(rows.lengths, 2048, 0, 0)):  # as the trainer reads them
    tokens += batch.num_tokens
assert tokens == int(rows.response_lengths.sum()), "every scored token once"
json.dump({"rc": 0, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "seconds": time.perf_counter() - t},
          open(os.environ["PEAR_BENCH_RESULT"], "w"))
"""


def make_corpus(n: int, path: Path) -> None:
    """n rows cycled from the world corpus, each with its own id; written in bounded batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pq.read_table(WORLD / "corpus.parquet").drop_columns(["id"])
    with pq.ParquetWriter(path, base.schema.append(pa.field("id", pa.string()))) as w:
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            t = base.take(pa.array([(start + i) % base.num_rows for i in range(k)]))
            w.write_table(t.append_column("id", pa.array([f"row-{start + i:07d}" for i in range(k)])))


def fresh_process(code: str, args: list[str]) -> tuple[dict, str]:
    """(the JSON `code` wrote to $PEAR_BENCH_RESULT, its terminal output) of a fresh Python process
    running `code`, so that its peak RSS is its own. The output is for error messages only."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), PEAR_BENCH_RESULT=str(result))
        out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode or not result.exists():
            raise RuntimeError(f"benchmark process failed (exit {out.returncode}):\n"
                               f"{(out.stdout + out.stderr)[-3000:]}")
        return json.loads(result.read_text()), out.stdout + out.stderr


def run(code: str, args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh process running `code`."""
    r, output = fresh_process(code, args)
    if r["rc"] != 0:
        raise RuntimeError(f"scoring exited {r['rc']}:\n{output[-3000:]}")
    return r["rss_kib"] / 1024, r["seconds"]


@dataclass
class ScaleBenchConfig:
    """Memory against corpus size: the scoring driver and the SFT data loader."""

    sizes: str = field("10000,100000", "corpus rows of each measurement, comma-separated (the first and the last "
                                       "make the ratio)")
    out: str = field("runs/bench-scale", "work folder: the synthetic corpora and their scores")


def bench(a: ScaleBenchConfig) -> str:
    """One line per size as it is measured; returns the ratio line and the line naming the JSON."""
    from pipelines.world import build, world_config

    build(WORLD, world_config())
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(x) for x in a.sizes.split(",")]:
        corpus, scores = work / f"corpus-{n}.parquet", work / f"scores-{n}"
        make_corpus(n, corpus)
        shutil.rmtree(scores, ignore_errors=True)  # scored from scratch (a rerun would keep unchanged shards)
        score_rss, score_s = run(SCORE, ["--data", str(corpus), "--out", str(scores), "--target", str(WORLD / "target"),
                                         "--executor", "local", "--backend", "torch"])
        load_rss, load_s = run(LOAD, [str(scores)])
        results.append({"rows": n, "driver_peak_rss_mib": round(score_rss, 1), "score_seconds": round(score_s, 1),
                        "loader_peak_rss_mib": round(load_rss, 1), "loader_epoch_seconds": round(load_s, 1)})
        print(f"{n:>7} rows: scoring driver peak RSS {score_rss:7.1f} MiB ({score_s:6.1f} s); "
              f"SFT loader peak RSS {load_rss:7.1f} MiB (one epoch {load_s:5.1f} s)", flush=True)
    lo, hi = results[0], results[-1]
    ratios = {"driver": hi["driver_peak_rss_mib"] / lo["driver_peak_rss_mib"],
              "loader": hi["loader_peak_rss_mib"] / lo["loader_peak_rss_mib"]}
    ratio_line = (f"peak RSS ratio {hi['rows']} / {lo['rows']} rows: driver {ratios['driver']:.2f}x, "
                  f"loader {ratios['loader']:.2f}x (goal: at most 1.2)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "results": results, "ratios": ratios}
    dest = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "bench_scale.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=1) + "\n")
    return f"{ratio_line}\nwritten {dest}"


def main(argv=None) -> int:
    return cli(ScaleBenchConfig, argv, __doc__, bench, lambda lines: lines)


if __name__ == "__main__":
    sys.exit(main())
