"""The scored-shard format (schema version 2, version 1 still read): writing, reading, checking.

Columns (README "Shard format" documents each):
- `id` string: the row's id (its own, or a hash of its content).
- `input_ids` list<int32>: the whole sequence as the trainer uses it (chat template applied).
- `prompt_len` int32: tokens before the first scored token (context only).
- `response_spans` list<struct<start: int32, end: int32>>: [start, end) positions in `input_ids`
  of every scored span (each assistant turn), in order; the first starts at `prompt_len`.
- `target_logprobs`, `behavior_logprobs`, `weights` list<float32>: one value per scored token,
  all spans in order (their future sums run over the later spans too).
- then the corpus's other columns, untouched.
Version 1 had no `response_spans`: one span, `input_ids[prompt_len:]`.
File metadata key `pear` holds a JSON object describing how the shard was made.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.storage import TMP_PREFIX, as_path, replace

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
ROW_GROUP_ROWS = 256  # the unit a lazy reader fetches
META_KEY = b"pear"
SPANS_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())]))
CORE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("prompt_len", pa.int32()),
    pa.field("response_spans", SPANS_TYPE),
    pa.field("target_logprobs", pa.list_(pa.float32())),
    pa.field("behavior_logprobs", pa.list_(pa.float32())),
    pa.field("weights", pa.list_(pa.float32())),
]
CORE_NAMES = [f.name for f in CORE_FIELDS]
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                           ("field", pa.string()), ("reason", pa.string())])


class ShardError(ValueError):
    """A shard that cannot be used: names the file (and row where there is one)."""


class NotAShard(ShardError):
    """A readable Parquet file without the `pear` metadata: someone else's file, never deleted."""


def core_table(ids, input_ids, spans, target_lps, behavior_lps, weights) -> pa.Table:
    """The schema columns from per-row Python/numpy values; `spans`: per row a list of (start, end)."""
    f32 = pa.list_(pa.float32())
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "input_ids": pa.array([np.asarray(x, np.int32) for x in input_ids], pa.list_(pa.int32())),
        "prompt_len": pa.array([sp[0][0] for sp in spans], pa.int32()),
        "response_spans": pa.array([[{"start": a, "end": b} for a, b in sp] for sp in spans], SPANS_TYPE),
        "target_logprobs": pa.array([np.asarray(x, np.float32) for x in target_lps], f32),
        "behavior_logprobs": pa.array([np.asarray(x, np.float32) for x in behavior_lps], f32),
        "weights": pa.array([np.asarray(x, np.float32) for x in weights], f32),
    }, schema=pa.schema(CORE_FIELDS))


def write_atomic(table: pa.Table, path: Path, meta: dict | None = None) -> None:
    """Write a zstd Parquet file under a temporary name, then rename: readers never see half a file.
    Row groups of `ROW_GROUP_ROWS` rows let a reader fetch a few rows without the whole file."""
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    path = as_path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    replace(tmp, path)  # object storage: a copy, then the temporary key is deleted


def remove_temporaries(folder: Path) -> list:
    """Delete what writers killed mid-write left (`.NAME.tmp-PID`) in `folder` and `folder/rejects/parts`;
    call it only while holding the folder's lock (no other writer is at work). Returns what it deleted."""
    folder = as_path(folder)
    gone = []
    for place in (folder, folder / "rejects" / "parts"):
        if place.is_dir():
            for p in place.glob(f"{TMP_PREFIX}*.tmp-*"):
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def made_on() -> dict:
    """The machine that wrote a shard: its host name and, in a Ray worker, the Ray node id."""
    import socket
    import sys

    node = None
    if "ray" in sys.modules:  # never import Ray here: the local executor runs without it
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    return {"host": socket.gethostname(), "ray_node": node}


def read_meta(path: Path) -> dict:
    """The `pear` metadata of a shard; ShardError naming the file when it is not one, or unreadable."""
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    if META_KEY not in md:
        raise NotAShard(f"{path}: no '{META_KEY.decode()}' metadata; not a scored shard")
    return json.loads(md[META_KEY])


def list_shards(scores: Path) -> list[Path]:
    """Shard files of a scoring output folder, local or a URI (not rejects, not temporary files)."""
    scores = as_path(scores)
    if scores.is_file():
        return [scores]
    if not scores.is_dir():
        raise FileNotFoundError(f"scores folder not found: {scores}")
    return sorted(p for p in scores.glob("*.parquet") if not p.name.startswith("."))


def spans_of(table: pa.Table) -> list[list[tuple[int, int]]]:
    """Each row's scored spans; a version-1 table has one, from prompt_len to the end."""
    if "response_spans" in table.column_names:
        return [[(d["start"], d["end"]) for d in sp] for sp in table.column("response_spans").to_pylist()]
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    return [[(p, n)] for p, n in zip(table.column("prompt_len").to_pylist(), lengths)]


def check_table(path: Path, table: pa.Table, vocab_size: int | None = None,
                first_row: int = 0) -> list[list[tuple[int, int]]]:
    """Check rows against the schema; ShardError names the file and row (`first_row`: the table's offset).
    Returns each row's checked spans (`spans_of`), so that a caller need not read them again."""
    required = [c for c in CORE_NAMES if c != "response_spans"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: missing columns {missing}")
    ids = table.column("id").to_pylist()
    input_ids = table.column("input_ids").to_pylist()
    plen = table.column("prompt_len").to_pylist()
    spans = spans_of(table)
    where = lambda r: f"{path}: row {first_row + r} (id {ids[r]!r})"
    for r, (x, p, sp) in enumerate(zip(input_ids, plen, spans)):
        ends = [b for _, b in sp]
        starts = [a for a, _ in sp]
        if not sp or starts[0] != p or p < 1 or ends[-1] > len(x) or \
                any(a >= b for a, b in sp) or any(b > a for b, a in zip(ends, starts[1:])):
            raise ShardError(f"{where(r)}: response_spans {sp} are not ordered spans after prompt_len {p} "
                             f"inside {len(x)} tokens")
    n_scored = [sum(b - a for a, b in sp) for sp in spans]
    for col in ("target_logprobs", "behavior_logprobs", "weights"):
        values = table.column(col).to_pylist()
        for r, (n, v) in enumerate(zip(n_scored, values)):
            if v is None or len(v) != n:
                raise ShardError(f"{where(r)}: {col} has {0 if v is None else len(v)} values for {n} scored tokens")
    if vocab_size is not None:
        for r, x in enumerate(input_ids):
            if x and max(x) >= vocab_size:
                raise ShardError(f"{where(r)}: token id {max(x)} is outside the model's vocabulary of {vocab_size}")
    return spans


def check_meta(path: Path) -> dict:
    """A shard's metadata, if this code reads its schema version."""
    meta = read_meta(path)
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: schema_version {meta.get('schema_version')!r}, this code reads {READABLE_VERSIONS}")
    return meta


def tokenizer_sha256(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, the special tokens and the chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()
