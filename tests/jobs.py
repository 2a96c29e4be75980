"""Jobs that the fault tests start in the background, wait on and kill (a node, an actor or the driver).

Two rules keep such a test from failing on a slow machine for reasons of its own:
- the job's output goes to a file: a pipe that nobody reads fills up, and the job then stops at its
  next write, which looks like a hang;
- every wait on a job ends when the job exits, with its exit code and the end of its log, and has no
  clock of its own: the test's timeout (pytest-timeout) is the only one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


class Job:
    """A command run in its own session, its stdout and stderr in `log`."""

    def __init__(self, cmd: list[str], log: Path, **popen_kwargs):
        self.log = Path(log)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                     text=True, **popen_kwargs)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, chars: int = 3000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def wait_until(self, predicate, what: str, every: float = 0.02):
        """The first true value of `predicate()`, polled while the job runs. If the job exits first,
        one more look (it may have made the thing as it ended), then an AssertionError naming `what`."""
        while True:
            found = predicate()
            if found:
                return found
            if self.proc.poll() is not None:
                found = predicate()
                if found:
                    return found
                raise AssertionError(f"the job exited with {self.proc.returncode} before {what}; "
                                     f"its log ends:\n{self.tail()}")
            time.sleep(every)

    def finish(self, timeout: float | None = None) -> int:
        """Wait for the job to end by itself; its exit code."""
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the job and every process of its session (Ray's and vLLM's children too)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._out.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
