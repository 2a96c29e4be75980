"""Rewrite only the weights of scored shards from their stored logprobs (no scoring again).

    python -m scorer.reweight --scores runs/score --variant block [--block-size 4] [--gamma 0.999]

A constant not given keeps the shards' own value (`--gamma 0.99` on block shards stays block).

Shards are read one row group at a time (memory does not grow with the corpus). Every new shard is
first written aside (`.NAME.reweight-tmp` in the same folder) and the originals are replaced only
once all of them are written, so a shard that cannot be read leaves the folder as it was (this
needs the space of a second copy of the shards). Every column but `weights` and every metadata key
are kept; the `pear` metadata gets the new constants and summary.json the new diagnostics.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ConfigError, cli, field, setup_logging
from common.lock import locked
from common.storage import append_json_line, as_path, replace, run_id, write_json_atomic
from scorer.config import WeightConfig
from scorer.shards import META_KEY, ShardError, list_shards, read_meta
from scorer.stats import BATCH_ROWS, LOGPROB_COLUMNS, VariantStats, logprob_rows
from scorer.weights import WeightParams


@dataclass
class ReweightConfig:
    """New PEAR weights for existing shards."""

    GROUP_DEFAULTS: ClassVar[str] = "the shards' own"

    scores: str = field("runs/score", "scoring output folder")
    weights: WeightConfig = field(WeightConfig(), "PEAR weighting: --variant, --gamma, --block-size, --delta-clip, "
                                                  "--log-weight-clip; those not given keep the shards' values")


def reweight(scores: Path, params: WeightParams) -> dict:
    """Rewrite every shard's weights, all or none; returns the updated summary.

    ShardError names the first shard that cannot be read or written; the originals are then untouched.
    """
    t0 = time.perf_counter()
    shards = list_shards(scores)
    if not shards:
        raise ShardError(f"{scores}: no shards to reweight")
    stats = VariantStats(params)
    staged = []  # (temporary, original), written so far
    try:
        for path in shards:
            staged.append((path.with_name(f".{path.name}.reweight-tmp"), path))
            rewrite_shard(path, staged[-1][0], params, stats)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        replace(tmp, path)  # object storage: a server-side copy each, after every new shard is written
    summary_path = as_path(scores) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["params"] = params.as_dict()
    summary["variants"] = stats.result()
    # the speed stays the scoring runs' (the shards keep their `scored_by`); this is the reweight's own
    summary["reweighted"] = {"params": params.as_dict(), "shards": len(shards),
                             "seconds": round(time.perf_counter() - t0, 2)}
    write_json_atomic(summary, summary_path)
    append_json_line({"run": run_id(), "reweighted": summary["reweighted"]}, as_path(scores) / "history.jsonl")
    return summary


def stored_params(scores: Path) -> dict:
    """The weight constants the shards were written with (every shard's must agree: ShardError names
    the first that differs)."""
    first, stored = None, None
    for path in list_shards(scores):
        meta = {k: v for k, v in read_meta(path).items() if k in WeightParams().as_dict()}
        if stored is None:
            first, stored = path, meta
        elif meta != stored:
            keys = sorted(k for k in stored if meta.get(k) != stored[k])
            raise ShardError(f"{path} was weighted with other constants than {first.name} ({', '.join(keys)}); "
                             "give them all as flags")
    if stored is None:
        raise ShardError(f"{scores}: no shards to reweight")
    return stored


def rewrite_shard(path: Path, out: Path, params: WeightParams, stats: VariantStats) -> None:
    """Write `path` to `out` with new weights, row group by row group, adding its rows to `stats`."""
    try:
        meta = read_meta(path)
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    with shard:
        schema = shard.schema_arrow
        missing = [c for c in (*LOGPROB_COLUMNS, "weights") if c not in schema.names]
        if missing:
            raise ShardError(f"{path}: missing columns {missing}")
        col = schema.get_field_index("weights")
        new_meta = json.dumps({**meta, **params.as_dict()}, sort_keys=True).encode()
        schema = schema.with_metadata({**(schema.metadata or {}), META_KEY: new_meta})
        try:
            writer = pq.ParquetWriter(out, schema, compression="zstd")
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{path}: cannot write {out.name} ({e})") from None
        with writer:
            first_row = 0
            for g in range(shard.num_row_groups):
                try:
                    table = shard.read_row_group(g)
                except (OSError, pa.ArrowException) as e:
                    raise ShardError(f"{path}: cannot read ({e})") from None
                weights = []
                for start in range(0, table.num_rows, BATCH_ROWS):  # bounds the padded (B, T) tensors
                    target, behavior = logprob_rows(table.slice(start, BATCH_ROWS), path, first_row + start)
                    try:
                        weights += stats.add(target, behavior)[params.variant][0]
                    except ValueError as e:
                        raise ShardError(f"{path}: rows from {first_row + start}: {e}") from None
                table = table.set_column(col, schema.field(col), pa.array(weights, schema.field(col).type))
                try:
                    writer.write_table(table, row_group_size=max(table.num_rows, 1))  # same row groups
                except (OSError, pa.ArrowException) as e:
                    raise ShardError(f"{path}: cannot write {out.name} ({e})") from None
                first_row += table.num_rows


def run(cfg: ReweightConfig, given: set[str]) -> tuple[str, WeightParams, list[str]]:
    """Reweight with the constants given, the shards' own for the others; returns the folder, the
    constants used and the names kept from the shards."""
    if not as_path(cfg.scores).is_dir():  # a local folder or an object-storage URI
        raise ConfigError(f"scores folder not found: {cfg.scores}")
    with locked(cfg.scores, "--scores"):  # no scoring job or other reweight writes meanwhile
        stored = stored_params(as_path(cfg.scores))
        named = {k: v for k, v in dataclasses.asdict(cfg.weights).items() if k in given}
        try:
            params = WeightParams.from_dict({**stored, **named})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{e} (the constants not given are the shards' own: {stored})") from None
        reweight(as_path(cfg.scores), params)
    return cfg.scores, params, [k for k in params.as_dict() if k not in named]


def report(result) -> str:
    scores, params, kept = result
    kept = f" ({', '.join(kept)} kept from the shards)" if kept else ""
    return f"reweighted {scores} with {params.as_dict()}{kept}"


def main(argv=None) -> int:
    setup_logging()
    # not quiet: nothing but pyarrow runs here, and a log would need the folder before it is checked
    return cli(ReweightConfig, argv, __doc__, run, report, errors=(ShardError,), given=True)


if __name__ == "__main__":
    sys.exit(main())
