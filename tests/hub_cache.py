"""A Hugging Face hub cache laid out the way `huggingface_hub` lays it out, for offline tests.

    <cache>/models--<org>--<name>/blobs/<sha256 of the file>
    <cache>/models--<org>--<name>/snapshots/<commit>/<file> -> ../../blobs/<sha256>
    <cache>/models--<org>--<name>/refs/main                  (the commit, 40 hex digits)

With HF_HUB_CACHE pointing at <cache> and HF_HUB_OFFLINE=1, `snapshot_download("org/name")` and
`from_pretrained("org/name")` find the model there without a network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_model(cache: Path, repo_id: str, folder: Path, kind: str = "models") -> str:
    """Put every file of `folder` into `cache` as `repo_id`'s main revision; returns the commit."""
    repo = Path(cache) / f"{kind}--{repo_id.replace('/', '--')}"
    files = sorted(f for f in Path(folder).rglob("*") if f.is_file())
    commit = hashlib.sha1(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def offline_env(monkeypatch, cache: Path) -> None:
    """Point the hub library at `cache`, offline (the way a user without network runs)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its constants at import; tell the already imported module too
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
