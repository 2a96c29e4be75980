"""Shared fixtures: the embedded world (built once, cached under artifacts/) and quiet engines."""
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the tests run make as a user types it at a shell: not as a sub-make of `make test`, whose
# command-line variables (ARGS=... for pytest) would reach every make the tests start
for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
    os.environ.pop(name, None)
os.environ["PEAR_QUIET"] = "0"  # tests read the stages' output (test_console.py sets 1 for its children)

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs the tests in parallel processes (pytest-xdist): each gets its share of the cores,
# so that their torch threads do not outnumber the cores (the world build sets its own count)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))


def pytest_collection_modifyitems(items):
    """The longest tests first: `make test` hands tests to its workers in this order as each gets
    free (pytest-xdist --dist load), so the long ones start early and the workers end together. A
    slow test's `seconds` is its rough cost on 2 cores (from `--durations`); the rest keep their order."""
    def cost(item) -> float:
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.kwargs.get("seconds", 1)

    items.sort(key=cost, reverse=True)


@pytest.fixture(scope="session")
def world() -> Path:
    """The embedded world folder (tokenizer/, target/, behavior/, corpus.parquet)."""
    from pipelines.world import build, world_config, world_dir

    logging.getLogger("pear").setLevel(logging.WARNING)
    return build(ROOT / world_dir(), world_config())


@pytest.fixture(scope="session")
def tokenizer(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "tokenizer")


@pytest.fixture(scope="session")
def scores(world, tmp_path_factory):
    """96 rows of the embedded corpus scored with the torch backend, in two shards (read-only)."""
    import polars as pl

    from scorer.job import ScoreConfig, run

    tmp = tmp_path_factory.mktemp("sft_scores")
    pl.read_parquet(world / "corpus.parquet").head(96).write_parquet(tmp / "corpus.parquet")
    out = tmp / "scores"
    run(ScoreConfig(data=str(tmp / "corpus.parquet"), out=str(out), target=str(world / "target"),
                    behavior=str(world / "behavior"), backend="torch", executor="local", rows_per_shard=48),
        progress=False)
    return out


class Killed(Exception):
    """A trainer stopped right after one of its checkpoints (see `train_killed_after`)."""


@pytest.fixture
def train_killed_after(monkeypatch):
    """train_killed_after(run, step): `run()` raises Killed right after writing checkpoint `step`,
    as if the process had died there; the checkpoint is whole, nothing after it is written."""
    from train import checkpoint

    def killed(run, step: int) -> None:
        save = checkpoint.save

        def save_then_die(out, at, *a, **kw):
            folder = save(out, at, *a, **kw)
            if at == step:
                raise Killed
            return folder

        monkeypatch.setattr(checkpoint, "save", save_then_die)
        try:
            with pytest.raises(Killed):
                run()
        finally:
            monkeypatch.setattr(checkpoint, "save", save)

    return killed
