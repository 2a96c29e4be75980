"""The weights page against corpus size: choosing its rows on 10k and 100k rows, and a 300-row page.

    python -m bench.bench_view [--sizes 10000,100000] [--scores runs/score] [--out runs/bench-view]

Shards of N rows are made from a scored corpus (SCORES: by default the embedded corpus scored into
runs/score, scored first where it is not there) by cycling its rows under new ids, in shards of
1024 rows as the scorer writes them. For each size a page of the default rows (10 lowest, 10
highest, 10 at random) is made in a fresh process, which reports the seconds of the pass that
chooses the rows (it reads the logprobs and ids a batch at a time and feeds the statistics of the
summary), the page's whole time and the process's peak resident memory (ru_maxrss). The pass's CPU time
is reported beside its wall time: on a shared machine the wall time follows the other load (the
load average is recorded with each size). Then a page of
at least 300 rows of SCORES itself (N raised until the three kinds make 300 distinct rows): its
size. Printed: a line per size, the ratios of the largest size to the smallest (memory: goal at
most 1.2; time: linear is the size ratio), the 300-row page. JSON goes to $OUT/bench_view.json,
else bench/results/.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import cli, field
from bench.bench_scale import fresh_process
from pipelines.world import world_dir

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / world_dir()
SHARD_ROWS = 1024  # the scorer's rows_per_shard default

# the child writes its result to the file named by PEAR_BENCH_RESULT (stdout may be the stage's log)
VIEW = """
import json, os, resource, sys, time
from common.config import parse_given
from scorer.view import ViewConfig, view
t = time.perf_counter()
cfg, given = parse_given(ViewConfig, sys.argv[1:])
done = view(cfg, given)
json.dump({**done, "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "process_seconds": time.perf_counter() - t}, open(os.environ["PEAR_BENCH_RESULT"], "w"))
"""


def scored_corpus(scores: Path) -> Path:
    """SCORES, scoring the embedded corpus into it first if it holds no shards."""
    from scorer.job import ScoreConfig, run

    if not list(scores.glob("*.parquet")):
        from pipelines.world import build, world_config

        build(WORLD, world_config())
        run(ScoreConfig(data=str(WORLD / "corpus.parquet"), out=str(scores), target=str(WORLD / "target"),
                        behavior=str(WORLD / "behavior"), backend="torch", executor="local"), progress=False)
    return scores


def make_shards(source: Path, n: int, out: Path) -> None:
    """n rows cycled from the shards of `source`, each with its own id, in shards of SHARD_ROWS rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scorer.shards import list_shards, read_meta, write_atomic

    paths = list_shards(source)
    base = pa.concat_tables([pq.read_table(p) for p in paths])
    meta = read_meta(paths[0])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    col = base.schema.get_field_index("id")
    for start in range(0, n, SHARD_ROWS):
        k = min(SHARD_ROWS, n - start)
        t = base.take(pa.array([(start + i) % base.num_rows for i in range(k)]))
        t = t.set_column(col, "id", pa.array([f"row-{start + i:07d}" for i in range(k)], pa.string()))
        write_atomic(t, out / f"part-{start // SHARD_ROWS:05d}.parquet", meta)


def run(args: list[str]) -> dict:
    """`scorer.view` in a fresh process: its result, with peak RSS (KiB) and the process's seconds."""
    return fresh_process(VIEW, args)[0]


@dataclass
class ViewBenchConfig:
    """The weights page against corpus size."""

    sizes: str = field("10000,100000", "corpus rows of each measurement, comma-separated (the first and the last "
                                       "make the ratios)")
    scores: str = field("runs/score", "the scored corpus the rows are cycled from (the embedded one scored "
                                      "into it when it holds no shards)")
    page_rows: int = field(300, "rows of the page whose size is measured (of SCORES itself)")
    out: str = field("runs/bench-view", "work folder: the synthetic shards and the pages")


def bench(a: ViewBenchConfig) -> str:
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    source = scored_corpus(Path(a.scores))
    results = []
    for n in [int(x) for x in a.sizes.split(",")]:
        folder = work / f"scores-{n}"
        make_shards(source, n, folder)
        r = run(["--scores", str(folder), "--html", str(work / f"page-{n}.html")])
        results.append({"rows": n, "choose_seconds": r["choose_seconds"], "choose_cpu_seconds": r["choose_cpu_seconds"],
                        "page_seconds": r["seconds"], "peak_rss_mib": round(r["rss_kib"] / 1024, 1),
                        "page_mb": round(r["bytes"] / 1e6, 3), "load_average": round(os.getloadavg()[0], 1)})
        print(f"{n:>7} rows: choosing the rows {r['choose_seconds']:6.1f} s ({r['choose_cpu_seconds']:6.1f} s CPU), "
              f"the page {r['seconds']:6.1f} s, peak RSS {r['rss_kib'] / 1024:7.1f} MiB, "
              f"page {r['bytes'] / 1e6:.2f} MB (load average {os.getloadavg()[0]:.1f})", flush=True)
    lo, hi = results[0], results[-1]
    ratios = {"rows": hi["rows"] / lo["rows"], "choose_seconds": hi["choose_seconds"] / lo["choose_seconds"],
              "choose_cpu_seconds": hi["choose_cpu_seconds"] / lo["choose_cpu_seconds"],
              "peak_rss": hi["peak_rss_mib"] / lo["peak_rss_mib"]}
    lines = [f"{hi['rows']} / {lo['rows']} rows: choosing time {ratios['choose_seconds']:.2f}x wall, "
             f"{ratios['choose_cpu_seconds']:.2f}x CPU (linear: {ratios['rows']:.0f}x), peak RSS "
             f"{ratios['peak_rss']:.2f}x (goal: at most 1.2)"]

    # a page of at least `page_rows` distinct rows of the scored corpus: N up until the kinds make them
    n = -(-a.page_rows // 3)
    while True:
        page = run(["--scores", str(source), "--html", str(work / "page-300.html"), "--n", str(n)])
        if page["rows"] >= a.page_rows or page["rows"] == page["corpus_rows"]:
            break
        n += -(-(a.page_rows - page["rows"]) // 2)
    big = {"rows": page["rows"], "n": n, "corpus_rows": page["corpus_rows"], "mb": round(page["bytes"] / 1e6, 3),
           "seconds": page["seconds"]}
    lines.append(f"a page of {big['rows']} rows of {source} (N={n}): {big['mb']:.2f} MB (goal: under 5), "
                 f"{big['seconds']} s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "results": results, "ratios": ratios, "page": big}
    dest = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "bench_view.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=1) + "\n")
    return "\n".join(lines + [f"written {dest}"])


def main(argv=None) -> int:
    return cli(ViewBenchConfig, argv, __doc__, bench, lambda lines: lines)


if __name__ == "__main__":
    sys.exit(main())
