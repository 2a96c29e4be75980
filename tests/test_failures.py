"""No silent wrong results: changed inputs on resume, one bad row, locked and atomic folders, one-line errors."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError
from common.lock import locked
from pipelines.score import main as score_main
from scorer.job import ScoreConfig, run
from scorer.reweight import main as reweight_main
from scorer.shards import list_shards, read_meta
from train import rl as rl_train
from train import sft
from train.rewards import load_reward, safe_score

ROOT = Path(__file__).resolve().parents[1]


def world_rows(world, n) -> pl.DataFrame:
    return pl.read_parquet(world / "corpus.parquet").head(n)


def score(world, data, out, **kw):
    cfg = dict(data=str(data), out=str(out), target=str(world / "target"), behavior="none", executor="local",
               backend="torch", rows_per_shard=16)
    return run(ScoreConfig(**{**cfg, **kw}), progress=False)


def ids_in(out) -> list[str]:
    return sorted(pl.read_parquet(f"{out}/*.parquet")["id"].to_list())


def test_changed_rows_are_scored_again_and_vanished_ones_refused(world, tmp_path):
    data, out = tmp_path / "c.parquet", tmp_path / "s"
    rows = world_rows(world, 40)
    rows.head(35).write_parquet(data)
    score(world, data, out)
    time.sleep(0.01)
    # five ids renamed in the second unit (rows 16-31): that unit is scored again, the others kept
    renamed = rows.head(35).with_columns(pl.when(pl.int_range(pl.len()).is_between(20, 24))
                                         .then(pl.col("id") + "-new").otherwise(pl.col("id")).alias("id"))
    renamed.write_parquet(data)
    s = score(world, data, out)
    assert s["this_run"]["shards_scored"] == 1 and ids_in(out) == sorted(renamed["id"].to_list())
    # the file grows from 35 to 40 rows: the last unit (rows 32-39) is scored again, nothing missing
    grown = pl.concat([renamed, rows.slice(35, 5)])
    grown.write_parquet(data)
    s = score(world, data, out)
    assert s["this_run"]["shards_scored"] == 1 and s["rows_in"] == s["rows_written"] == 40
    assert ids_in(out) == sorted(grown["id"].to_list())
    # the file is touched but its rows are the same: nothing is scored
    os.utime(data)
    assert score(world, data, out)["this_run"]["shards_scored"] == 0
    # the file shrinks: a shard of rows that no longer exist is refused by name, or dropped with --overwrite
    grown.head(10).write_parquet(data)
    with pytest.raises(ConfigError, match=r"c-0000[12].parquet: it is not part of this corpus.s plan"):
        score(world, data, out)
    assert score(world, data, out, overwrite=True)["rows_written"] == 10


def test_one_bad_row_is_a_reject_and_the_job_goes_on(world, tmp_path):
    src = world_rows(world, 1).row(0, named=True)
    good = {"prompt": src["prompt"], "response_ids": src["response_ids"], "behavior_logprobs": src["behavior_logprobs"]}
    rows = [dict(good, id="ok-1", extra=1),
            {"id": "only-assistant", "messages": [{"role": "assistant", "content": "4"}], "extra": 2},
            {"id": "int-role", "messages": [{"role": 7, "content": "hi"}, {"role": "assistant", "content": "4"}]},
            dict(good, id="ok-2", extra="two"),  # mixed types in a JSON column: kept as JSON text
            dict(good, id="odd-role", messages=None, extra=None)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = score(world, data, tmp_path / "s")
    assert (s["rows_in"], s["rows_written"], s["rows_rejected"]) == (5, 3, 2)
    rejects = pl.read_parquet(tmp_path / "s" / "rejects" / "rejects.parquet")
    assert dict(zip(rejects["id"], rejects["field"])) == {"only-assistant": "messages", "int-role": "messages"}
    out = pl.read_parquet(f"{tmp_path / 's'}/*.parquet").sort("id")
    assert dict(zip(out["id"], out["extra"])) == {"ok-1": "1", "ok-2": "two", "odd-role": None}  # JSON text


def test_a_value_that_does_not_fit_its_column_rejects_the_row(world, tmp_path, monkeypatch):
    src = world_rows(world, 1).row(0, named=True)
    good = {"prompt": src["prompt"], "response_ids": src["response_ids"], "behavior_logprobs": src["behavior_logprobs"]}
    monkeypatch.setattr("scorer.sources.SCHEMA_SAMPLE_ROWS", 2)  # the type is taken from the first rows
    rows = [dict(good, id="a", n=1), dict(good, id="b", n=2), dict(good, id="c", n="three"),
            dict(good, id="d", meta={"k": 1}), dict(good, id="e", n=4)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = score(world, data, tmp_path / "s")
    rejects = pl.read_parquet(tmp_path / "s" / "rejects" / "rejects.parquet")
    assert rejects["id"].to_list() == ["c", "d"] and rejects["field"].to_list() == ["n", "meta"]
    assert "does not fit the column's type int64" in rejects["reason"][0]
    assert "not among the corpus's columns" in rejects["reason"][1]
    assert s["rows_written"] == 3


def test_a_column_of_two_types_in_two_files_names_both(world, tmp_path, capsys):
    rows = world_rows(world, 4)
    rows.with_columns(pl.lit(1).alias("k")).write_parquet(tmp_path / "a.parquet")
    rows.with_columns(pl.lit("x").alias("k")).write_parquet(tmp_path / "b.parquet")
    args = ["--data", str(tmp_path / "*.parquet"), "--out", str(tmp_path / "s"), "--target", str(world / "target"),
            "--executor", "local"]
    assert score_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "column 'k'" in err and "a.parquet" in err and "b.parquet" in err and "\n" not in err
    assert not (tmp_path / "s").exists()


def test_duplicate_ids_empty_inputs_and_unknown_roles_are_counted(world, tmp_path):
    src = world_rows(world, 1).row(0, named=True)
    good = {"prompt": src["prompt"], "response_ids": src["response_ids"], "behavior_logprobs": src["behavior_logprobs"]}
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.jsonl").write_text("")
    other = dict(good, prompt=src["prompt"] + " ")
    chat = {"id": "chat", "messages": [{"role": "user", "content": "1 + 1 ="}, {"role": "critic", "content": "hm"},
                                       {"role": "assistant", "content": "2"}]}
    rows = [dict(good, id="x"), dict(good, id="x"), dict(other, id="y"), dict(good, id="y"), chat]
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = score(world, folder, tmp_path / "s", behavior=str(world / "behavior"))
    assert s["rows_written"] == 5 and s["warnings"]["empty_sources"] == [str(folder / "empty.jsonl")]
    assert (s["warnings"]["duplicate_ids"], s["warnings"]["conflicting_ids"]) == (2, 1)
    assert s["warnings"]["unknown_roles"] == 1


def test_a_second_writer_is_refused_at_once_naming_the_holder(world, tmp_path, capsys):
    data, out = tmp_path / "c.parquet", tmp_path / "s"
    world_rows(world, 4).write_parquet(data)
    with locked(out):
        assert score_main(["--data", str(data), "--out", str(out), "--target", str(world / "target"),
                         "--executor", "local"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another job (pid {os.getpid()})" in err
        assert reweight_main(["--scores", str(out), "--variant", "block"]) == 2
        assert "in use by another job" in capsys.readouterr().err
    assert not list_shards(out)


def test_corrupt_or_foreign_shards_are_named_and_overwrite_recovers(world, tmp_path, capsys):
    data, out = tmp_path / "c.parquet", tmp_path / "s"
    world_rows(world, 20).write_parquet(data)
    score(world, data, out)
    bad = list_shards(out)[0]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    args = ["--data", str(data), "--out", str(out), "--target", str(world / "target"), "--behavior", "none",
            "--executor", "local", "--rows-per-shard", "16"]
    assert score_main(args) == 2
    assert str(bad) in capsys.readouterr().err
    assert sft.main(["--scores", str(out), "--out", str(tmp_path / "m")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert score_main(args + ["--overwrite", "true"]) == 0 and read_meta(bad)["rows"] == [0, 16]
    pq.write_table(pa.table({"x": [1]}), out / "notes.parquet")  # someone else's file in OUT
    for overwrite in ([], ["--overwrite", "true"]):  # never deleted
        assert score_main(args + overwrite) == 2
        assert "notes.parquet" in capsys.readouterr().err and (out / "notes.parquet").exists()


def test_user_errors_are_one_line_and_exit_2(world, tmp_path, capsys):
    data = tmp_path / "c.parquet"
    world_rows(world, 4).write_parquet(data)
    (tmp_path / "file").write_text("")
    base = ["--data", str(data), "--target", str(world / "target"), "--executor", "local"]
    for args, words in [(["--out", str(tmp_path / "file")], "is a file, not a folder"),
                        (["--out", str(tmp_path / "s"), "--rows-per-shard", "0"],
                         "--rows-per-shard must be at least 1")]:
        assert score_main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    (tmp_path / "syntax.py").write_text("def reward(:\n")
    (tmp_path / "imports.py").write_text("import no_such_module_here\ndef reward(c, e):\n    return 1.0\n")
    for name in ("syntax", "imports"):
        with pytest.raises(ValueError, match=f"reward file .*{name}.py cannot be loaded"):
            load_reward(f"{tmp_path / name}.py:reward")
        assert rl_train.main(["--model", str(world / "target"), "--out", str(tmp_path / "rl"),
                              "--reward", f"{tmp_path / name}.py:reward"]) == 2
        assert f"{name}.py cannot be loaded" in capsys.readouterr().err
        assert not (tmp_path / "rl").exists()


def test_makefile_passes_paths_with_globs_and_spaces_as_they_are():
    out = subprocess.run(["make", "-n", "score", "DATA=my data/*.jsonl", "TARGET=org/m", f"VENV={ROOT / '.venv'}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"--data[ =]'my data/\*\.jsonl'", out), out


def test_rewards_time_out_must_be_numbers_and_a_broken_reward_stops_the_run():
    slow = lambda c, e: time.sleep(5) or 1.0
    t = time.perf_counter()
    value, err = safe_score(slow, "x", {}, timeout=0.2)
    assert (value, time.perf_counter() - t < 2) == (0.0, True) and "took longer than 0.2 s" in err
    assert safe_score(lambda c, e: "0.75", "x", {})[1] == "returned str '0.75', not a number"
    assert safe_score(lambda c, e: True, "x", {}) == (1.0, None)
    ex = [{"prompt": "p", "answer": "a"}] * 2
    rewards, errors = rl_train.score_groups(lambda c, e: 1 / 0 if c == "bad" else 1.0, [["ok", "bad"], ["ok", "ok"]],
                                            ex, max_failures=0.5)
    assert rewards.tolist() == [[1.0, 0.0], [1.0, 1.0]] and len(errors) == 1
    with pytest.raises(rl_train.ConfigError, match="more than 50% of a step's rewards failed"):
        rl_train.score_groups(lambda c, e: 1 / 0, [["a", "b"], ["c", "d"]], ex, max_failures=0.5)


def test_sft_resumes_only_onto_the_same_weights(world, tmp_path, capsys):
    data, out = tmp_path / "c.parquet", tmp_path / "s"
    world_rows(world, 60).write_parquet(data)
    score(world, data, out)
    args = ["--scores", str(out), "--out", str(tmp_path / "m"), "--max-steps", "3", "--save-every", "1",
            "--token-budget", "512", "--threads", "1", "--progress", "false"]
    assert sft.main(args) == 0
    assert reweight_main(["--scores", str(out), "--variant", "sequence"]) == 0
    assert sft.main(args) == 2
    assert "other settings or data" in capsys.readouterr().err


def test_sft_on_shards_without_rows_says_so(world, tmp_path, capsys):
    data, out = tmp_path / "c.jsonl", tmp_path / "s"
    data.write_text(json.dumps({"prompt": "q", "response": ""}) + "\n")
    score(world, data, out, behavior=str(world / "behavior"))
    assert sft.main(["--scores", str(out), "--out", str(tmp_path / "m")]) == 2
    assert "hold no rows; every row was rejected" in capsys.readouterr().err
    shutil.rmtree(out)

