"""One writer per output folder: a job holds an exclusive lock on OUT/.lock while it runs.

The lock is an OS file lock (`fcntl.flock`), so it goes away with the process that held it, even
after `kill -9`; the file keeps the holder's pid for the message a second writer gets. The
folder is also checked to be a writable folder before any work starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from scorer.config import ConfigError

LOCK_NAME = ".lock"


def writable_folder(folder: str | Path, flag: str = "--out") -> Path:
    """ConfigError (one line) when `folder` is a file or cannot be made or written; creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {str(folder)!r} is a file, not a folder")
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(folder)!r} cannot be written ({existing} is not a writable folder)")
    return folder


@contextlib.contextmanager
def locked(folder: str | Path, flag: str = "--out"):
    """Hold `folder`'s lock for the block; ConfigError at once, naming the holder, if another has it."""
    folder = writable_folder(folder, flag)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{folder} is in use by another job (pid {holder}); wait for it to finish "
                              f"or use another {flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing releases the lock
