"""Models by local folder or hub id: one resolution for every stage.

A model is named by a folder holding `config.json`, or by a hub id `org/name`, optionally pinned
as `org/name@revision`. A hub id is fetched (or found in the hub cache) by `huggingface_hub`,
whose own environment (HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE, HF_TOKEN) decides whether it may
reach the network; nothing here sets it. Every stage then loads the local snapshot folder, and
records the id, the resolved commit and a content hash, so a result says what made it.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError

# a hub id, of a model or a dataset: name, org/name, org/name@revision
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@\S+)?$")
# what loading a causal LM and its tokenizer needs; other weight formats stay on the hub
SKIP = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "*.pth", "original/*", "onnx/*", "*.tflite"]


def split_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of a hub id (`HUB_ID`); None when `spec` is not one."""
    if not HUB_ID.match(spec):
        return None
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it and where it lies on this machine."""

    spec: str  # as given: a folder or `org/name[@revision]`
    path: str  # local folder with config.json
    repo_id: str | None = None  # hub id, None for a local folder
    revision: str | None = None  # the commit the hub id resolved to

    @property
    def pinned(self) -> str:
        """A spec that names exactly this model elsewhere (a Ray worker on another node)."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else self.path


def resolve_model(spec: str, what: str = "model") -> ModelRef:
    """A folder or hub id -> ModelRef; ConfigError (one line, naming `what` and `spec`) otherwise."""
    if not spec:
        raise ConfigError(f"no {what} given: name a model folder or a hub id (org/name)")
    local = Path(spec)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ConfigError(f"{what} {spec!r} is a folder without config.json (not a Hugging Face model folder)")
        return ModelRef(spec, str(local))
    hub_id = split_hub_id(spec)
    if hub_id is None or local.suffix in (".json", ".parquet", ".jsonl", ".py"):
        raise ConfigError(f"{what} {spec!r} not found: not a folder, and not a hub id (org/name[@revision])")
    repo_id, revision = hub_id
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, ignore_patterns=SKIP)
    except Exception as e:  # offline without a cached copy, unknown repo, no access, no network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what} {spec!r}: not a local folder, and the hub could not provide it "
                          f"({type(e).__name__}: {first})") from None
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"{what} {spec!r}: the hub snapshot has no config.json (not a transformers model)")
    return ModelRef(spec, path, repo_id, Path(path).name)


def hash_model_folder(folder: str | Path) -> dict:
    """Path and content hash of a model folder (weights, config, tokenizer files), recorded in the metadata.

    Files over 64 MiB are hashed by size and their first and last MiB, so that a multi-GB
    checkpoint is hashed in milliseconds.
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


def model_record(ref: ModelRef) -> dict:
    """What shard and run metadata say about a model: folder, content hash, hub id and commit."""
    rec = hash_model_folder(ref.path)
    if ref.repo_id:
        rec.update(repo_id=ref.repo_id, revision=ref.revision)
    return rec


def pinned(record: dict) -> str:
    """The spec that reopens a model recorded by `model_record`: its hub commit, or its folder."""
    return f"{record['repo_id']}@{record['revision']}" if record.get("repo_id") else record.get("path", "")
