"""A scoring actor killed mid-job (a local Ray instance started by the job): another takes its
place and the job ends with every unit scored once, the rows those of the local executor."""
import signal
import time

import pytest

from jobs import Job
from test_cluster import ROWS, check_whole, job_cmd, job_env, reference, shard_count  # noqa: F401 (fixture)
from test_object_storage import local_run, s3  # noqa: F401 (fixtures)


@pytest.mark.slow(seconds=50)
@pytest.mark.timeout(400)
def test_a_scoring_actor_killed_mid_job_is_replaced(world, reference, tmp_path):
    import psutil

    data, ref = reference
    out = tmp_path / "out"
    env = job_env()
    env.pop("RAY_ADDRESS", None)  # a local Ray instance, started by the job
    with Job(job_cmd(world, data, out, "--rows-per-shard", "2", "--cpus-per-actor", "0.5"), tmp_path / "job.log",
             cwd=tmp_path, env=env) as job:
        def actor():
            for p in psutil.Process(job.pid).children(recursive=True):
                try:
                    if "ShardScorer" in " ".join(p.cmdline()):
                        return p
                except psutil.Error:
                    pass
            return None

        job.wait_until(lambda: out.is_dir() and shard_count(out) >= 1, "its first shard")
        victim = job.wait_until(actor, "a scoring actor was found")
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        assert job.finish() == 0, job.tail()
    # the job went on after the kill: shards were written later, by the actor that took its place
    assert any(p.stat().st_mtime > killed_at for p in out.glob("*.parquet"))
    check_whole(out, ref, ROWS // 2)
