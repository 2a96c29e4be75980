"""What the output folder holds, and how fast it was made: summary.json, history.jsonl and the
printed summary.

The summary is of the shards as they are, whichever runs made them: a rerun that scores nothing
summarizes the same shards. Each run appends its own line to history.jsonl (`run_record`), and the
speed is that of the runs that made the shards there (`speed_of`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from common.storage import as_path, replace
from scorer.config import ScoreConfig
from scorer.corpus import KNOWN_ROLES
from scorer.shards import META_KEY, REJECT_SCHEMA, list_shards
from scorer.sources import Source
from scorer.stats import stats_of_shards, weight_table
from scorer.weights import WeightParams

log = logging.getLogger("pear.scorer")


def run_record(cfg: ScoreConfig, name: str, units: int, results: list[dict], wall: float, job_meta: dict) -> dict:
    """A run's line in history.jsonl. Two speeds, each named for its clock: tokens (prompt and
    response) per second of wall-clock time (engine start, Ray and writes included: the bar's
    `wall_tok_s`) and per second of scoring time (the units' own time, summed over the actors)."""
    tokens, scoring = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
    return {"run": name, "shards_scored": len(results), "shards_kept": units - len(results),
            "rows_scored": sum(r["rows_in"] for r in results), "tokens_scored": tokens,
            "wall_seconds": round(wall, 2), "scoring_seconds": round(scoring, 2),
            "wall_tokens_per_second": round(tokens / wall, 1) if results else None,
            "scoring_tokens_per_second": round(tokens / scoring, 1) if results else None,
            "backend": job_meta["backend"], "executor": cfg.executor}


def summarize(cfg: ScoreConfig, out: Path, units: list[dict], job_meta: dict, sources: list[Source]) -> dict:
    """The shards as they are: rows in = written + rejected, the merged rejects file, every variant's
    diagnostics, the speed of the runs that made them (`speed_of`), and the warnings: empty sources,
    duplicate ids, unknown chat roles (each a log line and a count)."""
    import pyarrow.parquet as pq

    parts = [p for p in (out / "rejects" / "parts" / u["shard"] for u in units) if p.exists()]
    by_field: dict[str, int] = {}
    tmp = out / "rejects" / ".rejects.parquet.tmp"
    with pq.ParquetWriter(tmp, REJECT_SCHEMA, compression="zstd") as writer:  # part by part
        for part in parts:
            t = pq.read_table(part, schema=REJECT_SCHEMA)
            writer.write_table(t)
            for f in t.column("field").to_pylist():
                by_field[str(f)] = by_field.get(str(f), 0) + 1
    replace(tmp, out / "rejects" / "rejects.parquet")
    shards = list_shards(out)
    footers = [pq.read_metadata(s) for s in shards]  # one footer read per shard: row count and `pear` metadata
    n_written = sum(f.num_rows for f in footers)
    with_units = {u["key"] for u in units}
    warnings = {"empty_sources": [src.key for src in sources if src.key not in with_units],
                **duplicate_ids(shards),
                "unknown_roles": sum(json.loads(f.metadata[META_KEY]).get("unknown_roles", 0) for f in footers)}
    variants = stats_of_shards(shards, cfg.weight_params())
    rows_in = sum(u["stop"] - u["start"] for u in units)
    summary = {
        "rows_in": rows_in,
        "rows_written": n_written,
        "rows_rejected": sum(by_field.values()),
        "rejects_by_field": dict(sorted(by_field.items())),
        "shards": len(shards),
        "response_tokens": variants["none"].get("tokens", 0),
        "speed": speed_of([json.loads(f.metadata[META_KEY]).get("scored_by") for f in footers],
                          read_history(out / "history.jsonl")),
        "params": {k: job_meta[k] for k in WeightParams().as_dict()},
        "backend": job_meta["backend"],
        "variants": variants,
        "warnings": warnings,
    }
    if warnings["empty_sources"]:
        log.warning("%d empty input(s), no rows: %s", len(warnings["empty_sources"]),
                    ", ".join(warnings["empty_sources"][:5]))
    if warnings["duplicate_ids"]:
        log.warning("%d rows repeat an earlier row's id (%d of these ids name different content: see summary.json)",
                    warnings["duplicate_ids"], warnings["conflicting_ids"])
    if warnings["unknown_roles"]:
        log.warning("%d messages have a role the common chat templates do not know (not one of %s); they went "
                    "through the template as they are", warnings["unknown_roles"], ", ".join(KNOWN_ROLES))
    if summary["rows_in"] != summary["rows_written"] + summary["rows_rejected"]:
        log.error("row accounting does not add up: %s",
                  {k: summary[k] for k in ("rows_in", "rows_written", "rows_rejected")})
    return summary


def read_history(path) -> list[dict]:
    """The lines of a history.jsonl ([] without one); a line that does not parse is skipped."""
    path = as_path(path)
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed writer
            continue
    return lines


def speed_of(records: list[dict | None], history: list[dict]) -> dict:
    """The speed of the runs that made the shards there, from each shard's `scored_by` record (None:
    a shard made before shards kept one) and those runs' lines in history.jsonl. Scoring time: the
    shards' tokens over their units' scoring seconds. Wall-clock: what those runs scored over their
    wall time, engine start and writes included. A run without a history line (killed) has no wall time."""
    timed = [r for r in records if r]
    tokens, scoring = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    made_by = {r["run"] for r in timed}
    runs = [h for h in history if h.get("run") in made_by and h.get("wall_seconds")]
    wall, wall_tokens = sum(h["wall_seconds"] for h in runs), sum(h["tokens_scored"] for h in runs)
    return {"shards_timed": len(timed), "tokens": tokens, "scoring_seconds": round(scoring, 2),
            "scoring_tokens_per_second": round(tokens / scoring, 1) if scoring else None,
            "runs": len(made_by), "wall_seconds": round(wall, 2),
            "wall_tokens_per_second": round(wall_tokens / wall, 1) if wall else None}


def duplicate_ids(shards: list[Path]) -> dict:
    """Rows whose id an earlier row already has, and the ids among them whose rows differ (other ids).

    Read shard by shard; 16 bytes per row are kept (a hash of the id and of the row's ids).
    """
    import pyarrow.parquet as pq

    h64 = lambda b: int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
    keys, contents = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for shard in shards:
        t = pq.read_table(shard, columns=["id", "input_ids"])
        keys.append(np.fromiter((h64(str(i).encode()) for i in t.column("id").to_pylist()), np.uint64))
        contents.append(np.fromiter((h64(np.asarray(x, np.int32).tobytes())
                                     for x in t.column("input_ids").to_numpy(zero_copy_only=False)), np.uint64))
    k, c = np.concatenate(keys), np.concatenate(contents)
    order = np.lexsort((c, k))
    k, c = k[order], c[order]
    repeat = k[1:] == k[:-1]
    conflicting = np.unique(k[1:][repeat & (c[1:] != c[:-1])])
    return {"duplicate_ids": int(repeat.sum()), "conflicting_ids": int(len(conflicting))}


def format_speed(speed: dict) -> str:
    """The two speeds by the names the bar and summary.json give them: tokens/s of wall-clock time
    (`wall_tok_s`, `wall_tokens_per_second`) and of scoring time (`scoring_tokens_per_second`)."""
    f = lambda x: "-" if x is None else f"{x:.0f}"
    return (f"tokens/s {f(speed['wall_tokens_per_second'])} wall-clock ({speed['wall_seconds']}s over "
            f"{speed['runs']} run{'s' * (speed['runs'] != 1)}), {f(speed['scoring_tokens_per_second'])} "
            f"of scoring time ({speed['scoring_seconds']}s)")


def format_summary(s: dict) -> str:
    """The printed summary: of a scoring run (`this_run` given) or of the shards as they are (`make inspect`)."""
    lines = [f"rows in {s['rows_in']} = written {s['rows_written']} + rejected {s['rows_rejected']}"
             + (f"  (rejects by field: {s['rejects_by_field']})" if s["rejects_by_field"] else "")]
    if "this_run" in s:
        r = s["this_run"]
        lines.append(f"this run: {r['shards_scored']} shards scored, {r['shards_kept']} kept, "
                     f"wall {r['wall_seconds']}s")
    lines.append(f"shards {s['shards']}, response tokens {s['response_tokens']}, backend {s['backend']}")
    if "speed" in s:  # summaries written before shards kept their own timing have none
        lines.append(f"the runs that scored them: {format_speed(s['speed'])}")
    if "reweighted" in s:
        r = s["reweighted"]
        lines.append(f"reweighted since: {' '.join(f'{k} {v}' for k, v in r['params'].items())} "
                     f"({r['shards']} shards, {r['seconds']}s)")
    lines += [f"{'variant':9} {'p1':>9} {'p50':>9} {'p99':>9} {'at lo':>6} {'at hi':>6} {'ESS tok':>8} {'ESS seq':>8}"]
    for r in weight_table(s):
        lines.append(f"{r.variant + ('*' if r.written else ' '):9} {r.p1:9.3g} {r.p50:9.3g} {r.p99:9.3g} "
                     f"{r.log_clip_lo:6.1%} {r.log_clip_hi:6.1%} {r.ess_tokens_fraction:8.1%} "
                     f"{r.ess_sequences_fraction:8.1%}")
    lines.append("(* the variant written to the shards; at lo/hi: share of tokens at the log-weight clip; "
                 "ESS as a share of tokens/sequences)")
    return "\n".join(lines)
