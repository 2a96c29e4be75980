"""A scoring actor killed mid-job (a local Ray instance started by the job): another takes its
place and the job ends with every unit scored once, the rows those of the local executor."""
import os
import signal
import subprocess
import time

import pytest

from test_cluster import ROWS, check_whole, job_cmd, job_env, reference, shard_count, wait_for  # noqa: F401 (fixture)
from test_object_storage import local_run, s3  # noqa: F401 (fixtures)


@pytest.mark.slow(seconds=50)
@pytest.mark.timeout(400)
def test_a_scoring_actor_killed_mid_job_is_replaced(world, reference, tmp_path):
    import psutil

    data, ref = reference
    out = tmp_path / "out"
    env = job_env()
    env.pop("RAY_ADDRESS", None)  # a local Ray instance, started by the job
    proc = subprocess.Popen(job_cmd(world, data, out, "--rows-per-shard", "2", "--cpus-per-actor", "0.5"),
                            cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def actor():
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "ShardScorer" in " ".join(p.cmdline()):
                        return p
                except psutil.Error:
                    pass
            return None

        wait_for(lambda: out.is_dir() and shard_count(out) >= 1, 240)
        victim = wait_for(actor, 30)
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    # the job went on after the kill: shards were written later, by the actor that took its place
    assert any(p.stat().st_mtime > killed_at for p in out.glob("*.parquet"))
    check_whole(out, ref, ROWS // 2)
