"""The scored-shard format (schema version 1): writing, reading, checking.

Columns: `id` string; `input_ids` list<int32> (prompt + response: the ids the trainer uses);
`prompt_len` int32; `target_logprobs`, `behavior_logprobs`, `weights` list<float32>, one value
per response token (`input_ids[prompt_len:]`); then the corpus's other columns, untouched.
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

SCHEMA_VERSION = 1
META_KEY = b"pear"
CORE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("prompt_len", pa.int32()),
    pa.field("target_logprobs", pa.list_(pa.float32())),
    pa.field("behavior_logprobs", pa.list_(pa.float32())),
    pa.field("weights", pa.list_(pa.float32())),
]
CORE_NAMES = [f.name for f in CORE_FIELDS]
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                           ("field", pa.string()), ("reason", pa.string())])


class ShardError(ValueError):
    """A shard that cannot be used: names the file (and row where there is one)."""


def core_table(ids, input_ids, prompt_lens, target_lps, behavior_lps, weights) -> pa.Table:
    """The six schema columns from per-row Python/numpy values."""
    f32 = pa.list_(pa.float32())
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "input_ids": pa.array([np.asarray(x, np.int32) for x in input_ids], pa.list_(pa.int32())),
        "prompt_len": pa.array(prompt_lens, pa.int32()),
        "target_logprobs": pa.array([np.asarray(x, np.float32) for x in target_lps], f32),
        "behavior_logprobs": pa.array([np.asarray(x, np.float32) for x in behavior_lps], f32),
        "weights": pa.array([np.asarray(x, np.float32) for x in weights], f32),
    }, schema=pa.schema(CORE_FIELDS))


def write_atomic(table: pa.Table, path: Path, meta: dict | None = None) -> None:
    """Write a zstd Parquet file under a temporary name, then rename: readers never see half a file."""
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ShardError(f"{path}: no '{META_KEY.decode()}' metadata; not a scored shard")
    return json.loads(md[META_KEY])


def list_shards(scores: Path) -> list[Path]:
    """Shard files of a scoring output folder (not rejects, not temporary files)."""
    scores = Path(scores)
    if scores.is_file():
        return [scores]
    if not scores.is_dir():
        raise FileNotFoundError(f"scores folder not found: {scores}")
    return sorted(p for p in scores.glob("*.parquet") if not p.name.startswith("."))


def check_shard(path: Path, vocab_size: int | None = None) -> tuple[dict, pa.Table]:
    """Read one shard and check it against schema version 1; ShardError names the file and row."""
    meta = read_meta(path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {meta.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    table = pq.read_table(path)
    missing = [c for c in CORE_NAMES if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: missing columns {missing}")
    ids = table.column("id").to_pylist()
    input_ids = table.column("input_ids").to_pylist()
    plen = table.column("prompt_len").to_pylist()
    for col in ("target_logprobs", "behavior_logprobs", "weights"):
        values = table.column(col).to_pylist()
        for r, (x, p, v) in enumerate(zip(input_ids, plen, values)):
            if v is None or len(v) != len(x) - p:
                raise ShardError(f"{path}: row {r} (id {ids[r]!r}): {col} has {0 if v is None else len(v)} "
                                 f"values for {len(x) - p} response tokens")
    if vocab_size is not None:
        for r, x in enumerate(input_ids):
            if x and max(x) >= vocab_size:
                raise ShardError(f"{path}: row {r} (id {ids[r]!r}): token id {max(x)} is outside the model's "
                                 f"vocabulary of {vocab_size}")
    return meta, table


def fingerprint(folder: str | Path) -> dict:
    """Path and content hash of a model folder (weights and config), recorded in the metadata.

    Files over 64 MiB are hashed by size and their first and last MiB, so that a multi-GB
    checkpoint is fingerprinted in milliseconds.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix not in (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja"):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return {"path": str(folder), "sha256": h.hexdigest()}


def tokenizer_sha256(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary, the special tokens and the chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()
