"""The experiment's reduced run: every arm goes through SFT, RL and evaluation, and the report is
complete and well-formed (pipelines.experiment.check_complete runs at its end)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.vllm
def test_experiment_smoke_writes_a_complete_report(world, tmp_path):
    from pipelines.experiment import ARMS

    out = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-m", "pipelines.experiment", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "experiment.json").read_text())
    assert set(report["arms"]) == set(ARMS)
    md = (out / "experiment.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in md
    assert "## What the numbers show" in md
    for png in ("experiment_reward_curves.png", "experiment_offline_vs_rl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
