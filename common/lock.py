"""One writer per output folder: a job holds an exclusive lock on OUT/.lock while it runs.

The lock is an OS file lock (`fcntl.flock`), so it goes away with the process that held it, even
after `kill -9`; the file keeps the holder's pid for the message a second writer gets. The
folder is also checked to be a writable folder before any work starts.

Object storage has no `fcntl`: there OUT/.lock is a lease, a small JSON object naming its owner
(host, pid) and an expiry, renewed by a thread while the job runs (every third of
PEAR_LEASE_SECONDS, default 60). A job takes the lease when there is none, when it has expired,
or when its owner is a process of this host that is gone (a killed driver's rerun need not wait);
it then reads the lease back after a short pause and goes on only if it is still its own. pyarrow
cannot write conditionally, so two jobs that both find the lease free within that pause can both
go on (see README "Scaling out"); one that starts while another holds the lease is refused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from common.config import ConfigError
from common.storage import ObjectPath, as_path, check_bucket

log = logging.getLogger("pear.lock")
LEASE_SETTLE_SECONDS = 1.0  # between writing the lease and reading it back

LOCK_NAME = ".lock"


def writable_folder(folder: str | Path, flag: str = "--out") -> Path:
    """ConfigError (one line) when `folder` is a file or cannot be made or written; creates nothing.
    A URI: its endpoint, credentials and bucket are checked (storage.check_bucket)."""
    folder = as_path(folder)
    if isinstance(folder, ObjectPath):
        check_bucket(folder, flag)
        if folder.is_file():
            raise ConfigError(f"{flag} {str(folder)!r} is a file, not a folder")
        return folder
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
    if isinstance(folder, ObjectPath):
        with leased(folder, flag):
            yield folder
        return
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


def lease_seconds() -> float:
    return float(os.environ.get("PEAR_LEASE_SECONDS", "60"))


def _read_lease(path: ObjectPath) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign object: treat as held until it expires by its age
        return {"owner": "unknown", "expires": path.stat().st_mtime_ns / 1e9 + lease_seconds()}


def lease_is_free(held: dict | None, now: float, host: str) -> bool:
    """No lease, an expired one, or one whose owner is a process of this host that no longer runs."""
    if held is None or held.get("expires", 0) < now:
        return True
    if held.get("host") == host and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


@contextlib.contextmanager
def leased(folder: ObjectPath, flag: str = "--out"):
    """Hold the lease object `folder/.lock` for the block (see the module docstring)."""
    path = folder / LOCK_NAME
    host = socket.gethostname()
    me = {"owner": f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}", "host": host, "pid": os.getpid()}

    def refuse(held):
        until = time.strftime("%H:%M:%S", time.localtime(held.get("expires", 0)))
        raise ConfigError(f"{folder} is in use by another job ({held.get('owner')}, lease until {until}); wait for "
                          f"it to finish or use another {flag}")

    def write():
        path.write_bytes(json.dumps({**me, "expires": time.time() + lease_seconds()}).encode())

    held = _read_lease(path)
    if not lease_is_free(held, time.time(), host):
        refuse(held)
    write()
    time.sleep(LEASE_SETTLE_SECONDS)  # another job that found the lease free has written its own by now
    held = _read_lease(path)
    if (held or {}).get("owner") != me["owner"]:
        refuse(held or {})
    stop = threading.Event()

    def renew():
        while not stop.wait(lease_seconds() / 3):
            now = _read_lease(path) or {}
            if now.get("owner") != me["owner"]:
                log.error("the lease on %s was taken by %s", folder, now.get("owner"))
                return
            write()

    thread = threading.Thread(target=renew, name="pear-lease", daemon=True)
    thread.start()
    try:
        yield folder
    finally:
        stop.set()
        thread.join()
        if (_read_lease(path) or {}).get("owner") == me["owner"]:
            path.unlink(missing_ok=True)
