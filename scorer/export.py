"""Scored shards -> Parquet that other trainers read: per-token weights aligned to the whole sequence.

    python -m scorer.export --scores runs/score --out runs/export [--convention trl]

Every shard becomes one Parquet file of the same name in OUT, written row group by row group
(memory does not grow with the corpus). Each row keeps `id` and the pass-through columns and gets,
aligned to `input_ids` (position t describes the token input_ids[t], the one the model predicts
from positions < t):

    loss_mask      int8: 1 on the trained tokens (every response span), 0 elsewhere
    token_weights  float32: the PEAR weight of each trained token, 0 elsewhere
    labels         int64 (--convention trl, or --labels true): input_ids where trained, -100 elsewhere

The conventions (README "Using the weights in other trainers"):
    pear      input_ids, loss_mask, token_weights
    trl       + labels (TRL's SFTTrainer takes pre-tokenized rows with `labels`; train/trl_trainer.py
              multiplies its per-token loss by token_weights)
    verl      as pear: verl's SFT dataset marks the trained tokens themselves and its loss rolls the
              mask one to the left
    openrlhf  loss_mask and token_weights shifted one to the left, as OpenRLHF's SFT dataset builds
              its mask: position t describes the prediction made at t (of input_ids[t + 1]); the
              last position is 0

The weights written are the shards' stored ones (`make reweight` first for another variant). The
`pear` metadata of each shard is kept, with `export` added (convention, source file).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ConfigError, cli, field, setup_logging
from common.lock import locked
from common.storage import as_path, replace
from scorer.shards import CORE_NAMES, META_KEY, NotAShard, ShardError, check_meta, check_table, list_shards, \
    read_meta

log = logging.getLogger("pear.export")
IGNORE_INDEX = -100  # the label of a token left out of the loss (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class Convention:
    """How one trainer family wants the per-token columns."""

    labels: bool  # add `labels` (input_ids, IGNORE_INDEX off the trained tokens)
    shifted: bool  # mask and weights at the position that predicts the token, not at the token


CONVENTIONS = {
    "pear": Convention(labels=False, shifted=False),
    "trl": Convention(labels=True, shifted=False),
    "verl": Convention(labels=False, shifted=False),
    "openrlhf": Convention(labels=False, shifted=True),
}


@dataclass
class ExportConfig:
    """Scored shards -> whole-sequence Parquet (input_ids, loss_mask, token_weights)."""

    scores: str = field("runs/score", "scoring output folder (shards made by scorer.job), or its s3:// or gs:// URI")
    out: str = field("runs/export", "output folder (or s3:// or gs:// URI): one Parquet file per shard")
    convention: str = field("pear", f"column convention: {', '.join(CONVENTIONS)}")
    labels: bool = field(False, "also write `labels` (-100 off the trained tokens) whatever the convention")
    progress: bool = field(True, "a log line per shard")


def sequence_columns(table: pa.Table, spans: list, convention: Convention, labels: bool) -> dict[str, pa.Array]:
    """loss_mask, token_weights (and labels) of a shard's rows, aligned to input_ids (`spans`: each
    row's scored spans, as `check_table` returns them)."""
    masks, weights, all_labels = [], [], []
    for ids, row_spans, w in zip(table.column("input_ids").to_pylist(), spans, table.column("weights").to_pylist()):
        n = len(ids)
        pos = np.concatenate([np.arange(a, b) for a, b in row_spans]) if row_spans else np.zeros(0, np.int64)
        mask = np.zeros(n, np.int8)
        weight = np.zeros(n, np.float32)
        mask[pos] = 1
        weight[pos] = np.asarray(w, np.float32)
        if labels:
            lab = np.full(n, IGNORE_INDEX, np.int64)
            lab[pos] = np.asarray(ids, np.int64)[pos]
            all_labels.append(lab)
        if convention.shifted:  # position t: the prediction of token t + 1
            mask = np.append(mask[1:], np.int8(0))
            weight = np.append(weight[1:], np.float32(0))
        masks.append(mask)
        weights.append(weight)
    out = {"loss_mask": pa.array(masks, pa.list_(pa.int8())),
           "token_weights": pa.array(weights, pa.list_(pa.float32()))}
    if labels:
        out["labels"] = pa.array(all_labels, pa.list_(pa.int64()))
    return out


def export_shard(path: Path, out: Path, convention: str, labels: bool) -> int:
    """Write one exported file from one shard; returns its rows. ShardError names the file and row."""
    meta = check_meta(path)
    conv = CONVENTIONS[convention]
    with_labels = labels or conv.labels
    try:
        shard = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    meta = {**meta, "export": {"convention": convention, "labels": with_labels, "from": str(path),
                               "shifted": conv.shifted}}
    tmp = out.with_name(f".{out.name}.export-tmp")
    writer, rows = None, 0
    try:
        with shard:
            for g in range(shard.num_row_groups) or [None]:  # None: a shard of no rows, its schema
                try:
                    table = shard.read_row_group(g) if g is not None else shard.read()
                except (OSError, pa.ArrowException) as e:
                    raise ShardError(f"{path}: cannot read ({e})") from None
                spans = check_table(path, table, first_row=rows)
                keep = ["id", "input_ids"] + [c for c in table.column_names if c not in CORE_NAMES]
                added = sequence_columns(table, spans, conv, with_labels)
                clash = sorted(set(keep) & set(added))
                if clash:
                    raise ShardError(f"{path}: the corpus column(s) {clash} would be replaced by the export's own; "
                                     "rename them in the corpus")
                columns = {**{c: table.column(c) for c in keep}, **added}
                result = pa.table(columns)
                if writer is None:
                    schema = result.schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                writer.write_table(result.cast(writer.schema), row_group_size=max(result.num_rows, 1))
                rows += table.num_rows
        writer.close()
        writer = None
        replace(tmp, out)  # object storage: a copy, then the temporary key is deleted
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def export(cfg: ExportConfig) -> dict:
    """Export every shard of `cfg.scores` into `cfg.out`; returns {shards, rows, convention}."""
    if cfg.convention not in CONVENTIONS:
        raise ConfigError(f"--convention {cfg.convention!r}: expected one of {', '.join(CONVENTIONS)}")
    shards = list_shards(cfg.scores)
    if not shards:
        raise ConfigError(f"--scores {cfg.scores}: no shards")
    out = as_path(cfg.out)  # a local folder or an object-storage URI, as SCORES
    if out.resolve() == as_path(cfg.scores).resolve():
        raise ConfigError("--out is the scores folder; export writes beside the shards, not over them")
    with locked(out):
        stale, names = [], {s.name for s in shards}
        for p in list_shards(out):
            try:
                if "export" not in read_meta(p):
                    raise NotAShard(f"{p}: not made by scorer.export")
            except ShardError as e:
                raise ConfigError(f"{e}; remove it or choose another --out") from None
            if p.name not in names:
                stale.append(p)
        rows = 0
        for i, path in enumerate(shards):
            rows += export_shard(path, out / path.name, cfg.convention, cfg.labels)
            if cfg.progress:
                log.info("exported %s (%d/%d shards, %d rows)", path.name, i + 1, len(shards), rows)
        for p in stale:  # a previous export's files for shards that are gone
            p.unlink()
    return {"shards": len(shards), "rows": rows, "convention": cfg.convention, "out": str(out)}


def main(argv=None) -> int:
    setup_logging()
    return cli(ExportConfig, argv, __doc__, export,
               lambda r: f"exported {r['rows']} rows in {r['shards']} shards to {r['out']} ({r['convention']})",
               errors=(ShardError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
