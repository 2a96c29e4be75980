"""Rewrite only the weights of scored shards from their stored logprobs (no scoring again).

    python -m scorer.reweight --scores runs/score --variant block [--block-size 4] [--gamma 0.999]

Shards are read one row group at a time (memory does not grow with the corpus). Every new shard is
first written aside (`.NAME.reweight-tmp` in the same folder) and the originals are replaced only
once all of them are written, so a shard that cannot be read leaves the folder as it was (this
needs the space of a second copy of the shards). Every column but `weights` and every metadata key
are kept; the `pear` metadata gets the new constants and summary.json the new diagnostics.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scorer.config import ConfigError, WeightConfig, field, parse
from scorer.lock import locked
from scorer.shards import META_KEY, ShardError, list_shards, read_meta, write_json_atomic
from scorer.stats import BATCH_ROWS, LOGPROB_COLUMNS, VariantStats, logprob_rows
from scorer.weights import WeightParams


@dataclass
class ReweightConfig:
    """New PEAR weights for existing shards."""

    scores: str = field("runs/score", "scoring output folder")
    weights: WeightConfig = field(WeightConfig(), "PEAR weighting: --variant, --gamma, --block-size, --delta-clip, --log-weight-clip")


def reweight(scores: Path, params: WeightParams) -> dict:
    """Rewrite every shard's weights, all or none; returns the updated summary.

    ShardError names the first shard that cannot be read or written; the originals are then untouched.
    """
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
        os.replace(tmp, path)
    summary_path = Path(scores) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["params"] = params.as_dict()
    summary["variants"] = stats.result()
    write_json_atomic(summary, summary_path)
    return summary


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


def main(argv=None) -> int:
    cfg = parse(ReweightConfig, argv, description=__doc__)
    try:
        params = cfg.weights.params()
        if not Path(cfg.scores).is_dir():
            raise FileNotFoundError(f"scores folder not found: {cfg.scores}")
        with locked(cfg.scores, "--scores"):  # no scoring job or other reweight writes meanwhile
            reweight(Path(cfg.scores), params)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reweighted {cfg.scores} with {params.as_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
