"""Beyond one machine: a Ray cluster of two nodes (started here), and a node of it lost mid-job.
(A scoring actor killed mid-job: test_lost_actor.py; SFT as two torchrun nodes: test_sft.py.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import Job
from scorer.execute import default_actors
from scorer.shards import list_shards, read_meta
from test_object_storage import ROWS, local_run, rows_of, s3, same_rows, upload  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_default_actors_follow_the_cluster():
    node = lambda cpu, gpu=0, alive=True: {"Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu}}
    # GPUs: one actor per GPU (per two GPUs with --gpus-per-actor 2), whatever the CPUs
    assert default_actors([node(8, 4), node(8, 4), node(2)], 1.0, 0.5, 100) == 8
    assert default_actors([node(8, 4), node(8, 4)], 2.0, 0.5, 100) == 4
    # no GPU: one per live node that can hold an actor; never more than the units; at least one
    assert default_actors([node(4), node(4), node(4, alive=False), node(0.25)], 0.0, 0.5, 100) == 2
    assert default_actors([node(4), node(4)], 0.0, 0.5, 1) == 1
    assert default_actors([], 0.0, 0.5, 10) == 1


# ---- a cluster of two nodes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on this machine. Each actor takes 2 logical CPUs (--cpus-per-actor 2),
    so the worker holds one actor and the head two (room for the one of a lost worker), with a CPU
    left on each node for Ray Data's own tasks."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 5, "include_dashboard": False})
    c.add_node(num_cpus=3)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def job_cmd(world, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pipelines.score", "--data", str(data), "--out", str(out), "--target",
            str(world / "target"), "--behavior", "none", "--backend", "torch", "--cpus-per-actor", "2", *extra]


def job_env(**kw) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **kw}


@pytest.mark.slow(seconds=70)
@pytest.mark.timeout(400)
def test_two_nodes_score_what_the_local_executor_scores(world, s3, local_run, cluster, tmp_path):
    corpus, local = local_run
    bucket = s3()
    data, out = f"{bucket}/c.parquet", f"{bucket}/scores"
    upload(corpus, data)
    # unchanged but for RAY_ADDRESS; --actors not given: one per node (no GPU here)
    # the pool starts scoring once both actors are up (Ray Data's default starts with the first ready
    # one, which on a busy machine can score every unit before the other is ready)
    proc = subprocess.run(job_cmd(world, data, out, "--rows-per-shard", "4"), cwd=tmp_path, timeout=300,
                          env=job_env(RAY_ADDRESS=cluster.address, RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="240"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "actors=2" in proc.stderr and "tok_s=" in proc.stderr  # the progress line
    nodes = {read_meta(p)["made_on"]["ray_node"] for p in list_shards(out)}
    alive = {n.node_id for n in cluster.list_all_nodes()}
    assert len(nodes) == 2 and nodes <= alive, (nodes, alive)  # actors on both nodes
    same_rows(rows_of(out), rows_of(local), tol=1e-5)  # the local executor's rows (other units: tol)


def shard_count(folder: Path) -> int:
    return len([p for p in folder.glob("*.parquet") if not p.name.startswith(".")])


def check_whole(out: Path, reference: Path, units: int) -> None:
    """Every unit has exactly one whole shard, nothing half-written is left, and the rows are the reference's."""
    assert shard_count(out) == units and not list(out.glob(".*tmp*"))
    rows = rows_of(out)
    assert rows["id"].n_unique() == len(rows) == ROWS
    same_rows(rows, rows_of(reference), tol=1e-5)
    assert json.loads((out / "summary.json").read_text())["rows_in"] == ROWS


@pytest.fixture(scope="module")
def reference(local_run, tmp_path_factory) -> tuple[Path, Path]:
    """(the corpus file, its shards scored by the local executor): what a job through a lost actor or
    node must end with."""
    corpus, scores = local_run
    data = tmp_path_factory.mktemp("reference") / "c.parquet"
    corpus.write_parquet(data)
    return data, scores


@pytest.mark.slow(seconds=80)
@pytest.mark.timeout(400)
def test_a_node_lost_mid_job_is_survived(world, reference, cluster, tmp_path):
    data, ref = reference
    worker = next(n for n in cluster.worker_nodes)
    out = tmp_path / "out"
    # the pool starts once both actors are up (as in the two-node test), so that the worker node's
    # actor has units to score: with Ray Data's default the head's actor may score them all first
    env = job_env(RAY_ADDRESS=cluster.address, RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="400")
    with Job(job_cmd(world, data, out, "--rows-per-shard", "2"), tmp_path / "job.log", cwd=tmp_path, env=env) as job:
        # the worker node has written a shard: its actor is at work; the node goes as a whole (SIGKILL)
        job.wait_until(lambda: out.is_dir() and any(read_meta(p)["made_on"]["ray_node"] == worker.node_id
                                                    for p in out.glob("*.parquet") if not p.name.startswith(".")),
                       "a shard was made on the worker node")
        cluster.remove_node(worker, allow_graceful=False)
        killed_at = time.time()
        assert job.finish() == 0, job.tail()
    assert any(p.stat().st_mtime > killed_at for p in out.glob("*.parquet"))
    check_whole(out, ref, ROWS // 2)
