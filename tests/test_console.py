"""PEAR_QUIET=1 (the Makefile's default): the terminal shows the stage's own lines; vLLM's and Ray's
output goes to the log file in the output folder."""
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Ray instance", "INFO", "Triton", "Loading safetensors", "Loading weights", "core_worker", "Warning",
         "WARNING")


@pytest.mark.slow
@pytest.mark.vllm
def test_quiet_scoring_shows_its_own_lines_and_logs_the_rest(world, tmp_path):
    pl.read_parquet(world / "corpus.parquet").head(16).write_parquet(tmp_path / "corpus.parquet")
    out = tmp_path / "scores"
    env = {**os.environ, "PEAR_QUIET": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.score", "--data", str(tmp_path / "corpus.parquet"),
                           "--target", str(world / "target"), "--behavior", str(world / "behavior"),
                           "--out", str(out), "--backend", "vllm", "--executor", "ray"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-3000:]
    # the stage's own output: its log lines, progress bar and summary
    assert "pear.scorer" in proc.stderr and "scoring shards" in proc.stderr
    assert "rows in 16 = written 16 + rejected 0" in proc.stdout and f"shards in {out}/" in proc.stdout
    assert proc.stderr.count(f"other libraries' output: {out / 'score.log'}") == 1
    assert not [word for word in NOISE if word in terminal], terminal
    # the rest is in the log, with our own lines
    log = (out / "score.log").read_text()
    assert "Ray instance" in log and "vllm" in log.lower() and "pear.scorer" in log


def test_not_quiet_by_default_in_a_child_without_the_variable(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PEAR_QUIET"}
    proc = subprocess.run([sys.executable, "-c", "from scorer import console; import sys; "
                           f"assert console.quiet({str(tmp_path / 'x.log')!r}) is None; "
                           "assert console.out() is sys.stdout and console.child_streams() == {}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "x.log").exists()
