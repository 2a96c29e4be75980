"""What a person sees: the pipeline's own progress and results on the terminal, the rest in a log.

With PEAR_QUIET=1 (the Makefile's default; `make ... VERBOSE=1` shows everything), an entry point
calls `quiet(OUT/<stage>.log)`. File descriptors 1 and 2, where vLLM, Ray, triton, torch's C++
code, Python warnings, other libraries' progress bars and child processes write, then go to that
file; the terminal keeps what the pipeline writes through `out()` and `err()`: its results, its
`pear.*` log lines (also copied to the file) and its progress bars. A child stage started with
`**child_streams()` writes to the terminal again and quiets itself into its own log. An exception
that ends a quiet stage prints its one-line cause and the log's path on the terminal, its
traceback in the log (`sys.excepthook`). A stage that refuses its inputs (exit 2) leaves nothing
behind: `discard_log()` removes the log and the folders that `quiet` made for it.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(name)s %(message)s"
_terminal: tuple | None = None  # (stdout, stderr) of the terminal, once quiet
_log: Path | None = None  # where other libraries' output goes now
_made: dict[Path, list[Path]] = {}  # a log this process created -> it and the folders made for it, deepest first


def out():
    """Where results go: the terminal's stdout."""
    return _terminal[0] if _terminal else sys.stdout


def err():
    """Where errors and progress bars go: the terminal's stderr."""
    return _terminal[1] if _terminal else sys.stderr


def child_streams() -> dict:
    """subprocess keyword arguments that give a child stage the terminal (nothing when not quiet)."""
    return {"stdout": _terminal[0], "stderr": _terminal[1]} if _terminal else {}


def quiet(log_path: str | Path) -> Path | None:
    """Send everything but the pipeline's own output to `log_path` (appended), if PEAR_QUIET=1.

    Called again, it moves the third-party output to the new file. Returns the log's path, or None
    when not quiet (or when the file cannot be opened: the stage then reports its output folder)."""
    global _terminal, _log
    if os.environ.get("PEAR_QUIET") != "1":
        return None
    log_path = Path(log_path)
    if log_path == _log:
        return log_path
    folders = [p for p in [log_path.parent, *log_path.parent.parents] if not p.exists()]
    existed = log_path.exists()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    if not existed:
        _made[log_path] = [log_path, *folders]
    sys.stdout.flush()
    sys.stderr.flush()
    if _terminal is None:
        _terminal = (os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
        handler = logging.StreamHandler(_terminal[1])
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.getLogger("pear").addHandler(handler)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log = log_path
    sys.excepthook = _report
    logging.getLogger("pear").info("other libraries' output: %s", log_path)
    return log_path


def discard_log() -> None:
    """After a refusal (bad input, exit 2): remove the current log when this process created it, and
    the folders made for it that are still empty. The inputs are checked before a stage writes
    anything of its own, so an output folder that was not there is not there afterwards."""
    global _log
    if _log is None or _log not in _made:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log_path, *folders = _made.pop(_log)
    log_path.unlink(missing_ok=True)  # fds 1 and 2 keep the open file until the next quiet()
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was written there
            break
    _log = None


def log_tail(n_bytes: int = 1 << 16) -> str:
    """The end of the third-party log this process writes to ("" when not quiet): what a library
    wrote there before it raised an exception that does not say it."""
    if _log is None:
        return ""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with open(_log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a Ray task error: the
    exception it wraps, raised in the worker)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return type(e).__name__ + (f": {lines[0][:300]}" if lines else "")


def _report(kind, e, tb) -> None:
    """sys.excepthook while quiet: the traceback to the log, the cause and the log's path to the terminal."""
    sys.__excepthook__(kind, e, tb)  # fd 2: the log
    sys.stderr.flush()
    if issubclass(kind, KeyboardInterrupt):
        print(f"interrupted (log: {_log})", file=err())
    else:
        print(f"error: {one_line(e)} (traceback in {_log})", file=err())
