"""PEAR_QUIET: off unless set to 1 (the Makefile sets it). With it, the terminal shows a stage's own
lines and vLLM's and Ray's output goes to the log file in the output folder: checked on a real
Ray + vLLM scoring run in tests/test_score_job.py (test_killed_ray_run_resumes_to_the_same_rows)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


QUIET_CHILD = """
import logging, os, subprocess, sys, warnings
from common import console
from common.config import setup_logging
setup_logging()
console.quiet(sys.argv[1])
os.write(1, b"c-level stdout\\n"); os.write(2, b"c-level stderr\\n")
print("a library's print"); warnings.warn("a library's warning")
logging.getLogger("vllm").warning("a library's log line")
logging.getLogger("pear.stage").info("our log line")
print("our result", file=console.out())
subprocess.run([sys.executable, "-c", "print('a child stage')"], check=True, **console.child_streams())
subprocess.run([sys.executable, "-c", "print('a library child')"], check=True)
"""


def test_quiet_keeps_the_terminal_for_our_output(tmp_path):
    log = tmp_path / "out" / "stage.log"
    proc = subprocess.run([sys.executable, "-c", QUIET_CHILD, str(log)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PEAR_QUIET": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["our result", "a child stage"]
    assert "our log line" in proc.stderr and f"other libraries' output: {log}" in proc.stderr
    assert not [x for x in ("c-level", "a library") if x in proc.stdout + proc.stderr]
    text = log.read_text()
    for line in ("c-level stdout", "c-level stderr", "a library's print", "a library's warning",
                 "a library's log line", "a library child", "our log line"):
        assert line in text, line
    assert "our result" not in text


def test_not_quiet_by_default_in_a_child_without_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PEAR_QUIET"}
    proc = subprocess.run([sys.executable, "-c", "from common import console; import sys; "
                           f"assert console.quiet({str(tmp_path / 'x.log')!r}) is None; "
                           "assert console.out() is sys.stdout and console.child_streams() == {}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "x.log").exists()


FAILING_CHILD = """
import sys
from common import console
from common.config import setup_logging
setup_logging()
console.quiet(sys.argv[1])
def load():
    raise RuntimeError("the model folder has no weights\\n(a second line of detail)")
load()
"""


def test_an_exception_that_ends_a_quiet_stage_prints_its_cause_and_the_log(tmp_path):
    log = tmp_path / "out" / "stage.log"
    proc = subprocess.run([sys.executable, "-c", FAILING_CHILD, str(log)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PEAR_QUIET": "1"}, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"error: RuntimeError: the model folder has no weights (traceback in {log})"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    text = log.read_text()
    assert "Traceback" in text and "in load" in text and "a second line of detail" in text


REFUSED = [  # a refused run of each stage the README names: missing data, a bad reward, no answer column, no shards
    ("score", ["pipelines.score", "--data", "{tmp}/missing.jsonl", "--target", "{world}/target"], "no corpus found"),
    ("rl", ["pipelines.rl", "rl", "--model", "{world}/target", "--reward", "nosuch"], "reward must be one of"),
    ("eval", ["pipelines.rl", "eval", "--model", "{world}/target", "--prompts", "{tmp}/prompts.jsonl"],
     "no `answer`"),
    ("sft", ["pipelines.sft", "--scores", "{tmp}/no-scores"], "no shards in"),
]


@pytest.mark.slow(seconds=60)
def test_a_refused_run_leaves_no_output_folder_and_no_log(world, tmp_path):
    # a refused run once left OUT created, with its .log in it, while the README says nothing is written
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1 + 2 =", "solution": "3"}\n')
    existing = tmp_path / "existing"
    existing.mkdir()
    # a new folder under new parents, and a new folder in one that was there (which stays, empty)
    for (stage, argv, words), parent in zip(REFUSED, ["fresh/out", "existing", "fresh/out", "existing"]):
        out = tmp_path / parent / stage
        cmd = [a.format(tmp=tmp_path, world=world) for a in argv] + ["--out", str(out)]
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PEAR_QUIET": "1"}, timeout=120)
        assert proc.returncode == 2 and words in proc.stderr.splitlines()[-1], (stage, proc.stderr)
        assert not out.exists(), stage
    assert not (tmp_path / "fresh").exists() and existing.is_dir() and not list(existing.iterdir())
