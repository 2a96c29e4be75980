"""Corpus sources: every form of input, read in uneven pieces, gives back exactly the rows written."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scorer.sources import InputError, open_source, open_sources

ROWS = [{"id": f"r{i}", "prompt": f"q{i}", "response": f"a{i}", "score": i / 4, "n": i} for i in range(20)]
PIECES = [(0, 3), (3, 11), (11, 20)]  # uneven, and across Parquet row groups of 7


def read_all(source, pieces=PIECES):
    """Rows of `source` read piece by piece, after a describe() -> JSON -> open_source round trip."""
    source = open_source(json.loads(json.dumps(source.describe())))
    rows, errors = [], []
    for start, stop in pieces:
        part, _, errs = source.read(start, stop)
        assert len(part) == stop - start
        rows += part
        errors += errs
    return rows, errors


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "array.json", "rows.parquet"])
def test_file_forms_read_back_in_pieces(tmp_path, name):
    path = tmp_path / name
    if name == "array.json":
        path.write_text(json.dumps(ROWS, indent=2))  # many lines per row
    elif name == "rows.parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=7)
    else:
        write_jsonl(path, ROWS)  # `.json` holding one object per line is read as JSONL

    [source] = open_sources(str(path))
    assert (source.key, source.stem) == (str(path), path.stem)
    assert source.num_rows() == len(ROWS)
    assert source.schema().names == list(ROWS[0])
    rows, errors = read_all(source)
    assert rows == ROWS and errors == []
    assert source.fingerprint() == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}


def test_parquet_read_returns_its_arrow_table(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups == 3
    rows, table, _ = open_sources(str(path))[0].read(5, 16)
    assert table.num_rows == 11 and table.to_pylist() == rows == ROWS[5:16]


def test_json_array_counts_items_not_lines(tmp_path):
    """Regression: a pretty-printed array of 20 rows was read line by line as 664 rows."""
    path = tmp_path / "array.json"
    path.write_text("\n  " + json.dumps(ROWS, indent=4))
    assert len(path.read_text().splitlines()) > 100
    [source] = open_sources(str(path))
    assert source.num_rows() == 20
    rows, table, _ = source.read(18, 20)
    assert table is None and rows == ROWS[18:]
    assert type(rows[0]["score"]) is float and type(rows[0]["n"]) is int  # not Decimal


def test_bad_jsonl_lines_are_none_with_their_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n   \nnot json\n[1, 2]\n{"a": 2}\n')  # blank lines are not rows
    [source] = open_sources(str(path))
    assert source.num_rows() == 4
    rows, _, errors = source.read(1, 4)
    assert rows == [None, None, {"a": 2}]
    assert [(e["row"], e["field"]) for e in errors] == [(1, "<line>"), (2, "<line>")]
    assert "unreadable JSON" in errors[0]["reason"] and "not a JSON object" in errors[1]["reason"]


def test_json_array_items_that_are_not_objects(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text('[{"a": 1}, 5, {"a": 2}, "x"]')
    [source] = open_sources(str(path))
    rows, _, errors = source.read(0, source.num_rows())
    assert rows == [{"a": 1}, None, {"a": 2}, None]
    assert [(e["row"], e["field"]) for e in errors] == [(1, "<row>"), (3, "<row>")]


def test_mixed_column_types_give_names_only(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"a": 1, "b": "x"}, {"a": "one", "c": 2}])
    schema = open_sources(str(path))[0].schema()
    assert schema.names == ["a", "b", "c"] and set(schema.types) == {pa.null()}


def test_truncated_json_array_names_the_file(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(ROWS)[:-30])
    [source] = open_sources(str(path))
    with pytest.raises(InputError, match=r"cut\.json: broken JSON array after item 19: parse error"):
        source.num_rows()
    with pytest.raises(InputError, match=r"cut\.json"):
        source.read(0, 20)


def test_folder_glob_and_exclude(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "out").mkdir()
    write_jsonl(corpus / "b.jsonl", ROWS[:2])
    pq.write_table(pa.Table.from_pylist(ROWS[2:5]), corpus / "a.parquet")
    (corpus / "sub" / "c.json").write_text(json.dumps(ROWS[5:6]))
    (corpus / "notes.txt").write_text("not a corpus file")
    write_jsonl(corpus / "out" / "scored.jsonl", ROWS[:1])

    sources = open_sources(str(corpus), exclude=corpus / "out")
    assert [s.key for s in sources] == [str(corpus / f) for f in ("a.parquet", "b.jsonl", "sub/c.json")]
    assert [s.num_rows() for s in sources] == [3, 2, 1]
    assert len(open_sources(str(corpus))) == 4
    assert [s.key for s in open_sources(f"{corpus}/**/*.json*")] == [
        str(corpus / f) for f in ("b.jsonl", "out/scored.jsonl", "sub/c.json")
    ]


def test_nothing_found_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    write_jsonl(out / "x.jsonl", ROWS[:1])
    for data, kwargs, message in [
        (tmp_path / "empty", {}, "no .parquet/.jsonl/.json files"),
        (f"{tmp_path}/*.parquet", {}, "no .parquet/.jsonl/.json files"),
        (out, {"exclude": out}, "outside"),
        (tmp_path / "notes.txt", {}, "unsupported file type '.txt'"),
        (tmp_path / "missing.jsonl", {}, "no corpus found at .*hub dataset id"),
    ]:
        with pytest.raises(InputError, match=message):
            open_sources(str(data), **kwargs)


def test_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    [source] = open_sources(str(tmp_path / "ds"), split="ignored")  # a single Dataset has no splits
    assert source.key == f"disk:{tmp_path / 'ds'}" and source.stem == "ds"
    assert source.num_rows() == 20 and source.schema().names == list(ROWS[0])
    rows, errors = read_all(source)
    assert rows == ROWS and errors == []
    _, table, _ = source.read(4, 9)
    assert isinstance(table, pa.Table) and table.to_pylist() == ROWS[4:9]
    assert open_source(source.describe()).fingerprint() == source.fingerprint()


def test_dataset_dict_saved_to_disk(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:12]), "test": datasets.Dataset.from_list(ROWS[12:])}
    ).save_to_disk(path)
    [source] = open_sources(str(path), split="test")
    assert (source.key, source.stem, source.num_rows()) == (f"disk:{path}:test", "dd_test", 8)
    assert read_all(source, [(0, 5), (5, 8)])[0] == ROWS[12:]
    for split in (None, "validation"):
        with pytest.raises(InputError, match="one of train, test"):
            open_sources(str(path), split=split)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "one")
    assert open_sources(str(tmp_path / "one"))[0].key == f"disk:{tmp_path / 'one'}:train"


# The hub cache as `hf download --repo-type dataset org/toy` (or `snapshot_download`) leaves it:
# HF_HUB_CACHE/datasets--org--toy/{blobs/<hash>, refs/main = <commit>, snapshots/<commit>/<file> ->
# ../../blobs/<hash>}. Offline, `datasets` 5.x `load_dataset("org/toy")` only finds datasets it
# prepared itself (HF_DATASETS_CACHE/org___toy/<config>/0.0.0/<commit>/), so a snapshot like this one
# is read through the sources' fallback: the snapshot folder given to `load_dataset`.
COMMIT = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: extra
  data_files:
  - split: train
    path: extra/rows.parquet
---
# toy
"""
HUB_SCRIPT = """
import json, sys
from scorer.sources import InputError, open_source, open_sources

out = {}
for name, config, split in [("train", None, None), ("test", None, "test"), ("extra", "extra", "train")]:
    [s] = open_sources("org/toy", config=config, split=split)
    again = open_source(json.loads(json.dumps(s.describe())))
    rows = [r for a, b in [(0, 2), (2, 3), (3, s.num_rows())] for r in again.read(a, b)[0]]
    out[name] = {"key": s.key, "stem": s.stem, "names": s.schema().names, "rows": rows,
                 "same_fingerprint": again.fingerprint() == s.fingerprint()}
try:
    open_sources("org/missing")
except InputError as e:
    out["missing"] = str(e)
print(json.dumps(out))
"""


def write_hub_snapshot(hub_cache: Path, files: dict[str, bytes]) -> None:
    repo = hub_cache / "datasets--org--toy"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        (repo / "blobs" / blob).write_bytes(content)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))


def parquet_bytes(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def test_hub_dataset_offline_from_hub_cache(tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    write_hub_snapshot(hf / "hub", {
        "README.md": README.encode(),
        "data/train-00000-of-00001.parquet": parquet_bytes(ROWS[:10]),
        "data/test-00000-of-00001.parquet": parquet_bytes(ROWS[10:14]),
        "extra/rows.parquet": parquet_bytes([{"text": f"t{i}"} for i in range(5)]),
    })
    for var, value in [("HF_HOME", hf), ("HF_HUB_CACHE", hf / "hub"), ("HF_DATASETS_CACHE", hf / "datasets"),
                       ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")]:
        monkeypatch.setenv(var, str(value))
    # `datasets` and `huggingface_hub` read these at import, so run where a user would: a fresh process
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(HUB_SCRIPT)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])

    assert out["train"]["key"] == "hf:org/toy:default:train" and out["train"]["stem"] == "toy_default_train"
    assert out["train"]["names"] == list(ROWS[0]) and out["train"]["rows"] == ROWS[:10]
    assert out["test"]["rows"] == ROWS[10:14]
    assert out["extra"]["key"] == "hf:org/toy:extra:train"
    assert out["extra"]["rows"] == [{"text": f"t{i}"} for i in range(5)]
    assert all(out[k]["same_fingerprint"] for k in ("train", "test", "extra"))
    assert out["missing"].startswith("no local path or hub dataset 'org/missing': ") and "\n" not in out["missing"]


def test_json_schema_has_the_columns_of_every_row(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "behavior_logprobs": [-1.0]}) + "\n")
    assert open_sources(str(f))[0].schema().names == ["prompt", "behavior_logprobs"]


@pytest.mark.parametrize("name, words", [("chat.jsnl", "no such file: 'chat.jsnl'; corpus files end in"),
                                         ("chat.jsonl", "no such file: 'chat.jsonl' (a hub"),
                                         ("rows.csv", "no such file: 'rows.csv'; corpus files end in")])
def test_a_name_without_a_folder_that_looks_like_a_file_is_a_missing_file(name, words, tmp_path, monkeypatch):
    # `DATA=chat.jsnl` (a typo) was looked up as a hub dataset: retries over the network, then a hub error
    import scorer.sources as sources

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_open_hub", lambda *a: pytest.fail(f"{name} was looked up on the hub"))
    with pytest.raises(InputError) as e:
        open_sources(name)
    assert str(e.value).startswith(words) and "org/name" in str(e.value)
    assert sources.looks_like_a_file(name)
    assert not any(map(sources.looks_like_a_file, ["gsm8k", "org/name", "name@v1.0", "org/chat.v2"]))
