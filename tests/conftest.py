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
