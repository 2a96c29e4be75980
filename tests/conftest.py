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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world() -> Path:
    """The embedded world folder (tokenizer/, target/, behavior/, corpus.parquet)."""
    from pipelines.world import WorldConfig, build

    logging.getLogger("pear").setLevel(logging.WARNING)
    return build(ROOT / "artifacts" / "world", WorldConfig())


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
