"""Shared fixtures: the embedded world (built once, cached under artifacts/) and quiet engines."""
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the tests run make as a user types it at a shell, not as a sub-make of `make test`: make hands its
# command-line variables (ARGS=... for pytest) to every make below it, in MAKEFLAGS and as variables
# of the environment
for name in re.findall(r"(?:^|\s)([A-Za-z_]\w*)=", os.environ.get("MAKEFLAGS", "").partition(" -- ")[2]):
    os.environ.pop(name, None)
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
    """The longest files first: `make test` hands each test file to a worker as it gets free
    (pytest-xdist --dist loadfile, in this order), so the long ones start early and the workers end
    together, and a file's module fixtures (a Ray cluster, a scored corpus) are made once. A slow
    test's `seconds` is its rough cost on 2 cores (from `--durations`); a file's cost, their sum."""
    def cost(item) -> float:
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.kwargs.get("seconds", 1)

    per_file = defaultdict(float)
    for item in items:
        per_file[item.path] += cost(item)
    items.sort(key=lambda item: (-per_file[item.path], str(item.path)))  # stable: a file keeps its order


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


def id_held_out_or_not(base: str, held_out: bool, fraction: float = 0.1) -> str:
    """`base-k` for the first k whose id the hash split (train.data.is_heldout) puts on the side asked for."""
    from train.data import is_heldout

    return next(f"{base}-{k}" for k in range(10_000) if is_heldout(f"{base}-{k}", fraction) == held_out)


@pytest.fixture(scope="session")
def twin_scores(world, tmp_path_factory):
    """96 rows built to have, in any draw of the world, what a tiny SFT run checks (held-out fraction
    0.1). 48 prompts of the corpus, each answered by a text the base has never seen (the prompt's
    words backwards, so its NLL starts high) and each under two ids picked with the held-out hash:
    the first always trained on, the second held out for every sixth prompt. So 8 rows are held
    out, each the twin of a trained row: held-out NLL falls as training fits them. The target
    scores as its own behavior: every delta is 0 and a token's weight is gamma to the number of
    tokens after it, at most 1 and below 1 but for the last, in every draw."""
    import polars as pl

    from scorer.job import ScoreConfig, run

    tmp = tmp_path_factory.mktemp("twin_scores")
    prompts = pl.read_parquet(world / "corpus.parquet", columns=["prompt"]).head(48)["prompt"].to_list()
    rows = []
    for i, prompt in enumerate(prompts):
        response = " ".join(reversed(prompt.split()))
        rows.append({"id": id_held_out_or_not(f"twin-{i:02d}", False), "prompt": prompt, "response": response})
        rows.append({"id": id_held_out_or_not(f"twin-{i:02d}", i % 6 == 0), "prompt": prompt, "response": response})
    pl.DataFrame(rows).write_parquet(tmp / "corpus.parquet")
    out = tmp / "scores"
    run(ScoreConfig(data=str(tmp / "corpus.parquet"), out=str(out), target=str(world / "target"),
                    behavior=str(world / "target"), backend="torch", executor="local", rows_per_shard=48),
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
