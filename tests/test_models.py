"""Models by folder or hub id, resolved through a hub cache the test lays out (offline)."""
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from common.config import ConfigError
from common.models import resolve_model
from scorer.job import ScoreConfig, run
from scorer.shards import list_shards, read_meta
from hub_cache import add_model, offline_env


@pytest.fixture
def hub(world, tmp_path, monkeypatch):
    """The world's target and behavior as hub models `pear-test/target` and `pear-test/behavior`."""
    cache = tmp_path / "hub"
    commits = {name: add_model(cache, f"pear-test/{name}", world / name) for name in ("target", "behavior")}
    offline_env(monkeypatch, cache)
    return commits


def test_folder_and_hub_id_resolve_to_a_loadable_folder(world, hub):
    assert resolve_model(str(world / "target")).path == str(world / "target")
    for spec in ("pear-test/target", "pear-test/target@main", f"pear-test/target@{hub['target']}"):
        ref = resolve_model(spec)
        assert (ref.repo_id, ref.revision) == ("pear-test/target", hub["target"])
        assert json.loads((Path(ref.path) / "config.json").read_text())["vocab_size"] > 0
        assert ref.pinned == f"pear-test/target@{hub['target']}"


def test_unknown_models_fail_in_one_line_naming_the_spec(world, hub, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {"pear-test/missing": "the hub could not provide it", str(tmp_path / "empty"): "without config.json",
             "not a model!": "not a hub id", "pear-test/target@0000000000000000000000000000000000000000": "hub"}
    for spec, words in cases.items():
        with pytest.raises(ConfigError) as e:
            resolve_model(spec, "target")
        assert spec in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_scoring_and_sft_take_hub_ids_and_record_the_commit(world, hub, tmp_path):
    corpus = tmp_path / "chat.jsonl"
    rows = pl.read_parquet(world / "corpus.parquet").head(12)
    with open(corpus, "w") as f:
        for r in rows.iter_rows(named=True):  # behavior-less chat rows: the behavior model scores them
            f.write(json.dumps({"id": r["id"], "messages": [{"role": "user", "content": r["prompt"]},
                                                            {"role": "assistant", "content": r["response"]}]}) + "\n")
    out = tmp_path / "scores"
    summary = run(ScoreConfig(data=str(corpus), out=str(out), target="pear-test/target", behavior="pear-test/behavior",
                              executor="local", backend="torch"), progress=False)
    assert summary["rows_written"] == 12
    meta = read_meta(list_shards(out)[0])
    assert meta["target_model"]["repo_id"] == "pear-test/target" and meta["target_model"]["revision"] == hub["target"]
    assert meta["behavior"]["model"]["revision"] == hub["behavior"]

    from train import sft

    # no --model: the shards' target, reopened by its hub id and commit
    assert sft.main(["--scores", str(out), "--out", str(tmp_path / "sft"), "--max-steps", "2", "--threads", "1",
                     "--token-budget", "512", "--progress", "false"]) == 0
    s = json.loads((tmp_path / "sft" / "train_summary.json").read_text())
    assert "pear-test--target" in s["model"] and s["steps"] == 2
    shutil.rmtree(tmp_path / "hub")  # the trained folder stands on its own
    assert (tmp_path / "sft" / "config.json").exists()
