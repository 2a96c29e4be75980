"""Corpus sources: where the rows come from, read in bounded pieces.

A source is one Parquet file, JSONL file, JSON array file, or `datasets` dataset (saved with
`save_to_disk`, or a hub id). The scoring job splits it into units of rows [start, stop) that may
be read in another process, so every source describes itself as a small JSON-able dict that
`open_source` reopens, and `read` touches only the rows asked for (Parquet: the overlapping row
groups; JSON: a streamed pass that stops at `stop`; datasets: a slice of the memory-mapped table).
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.models import split_hub_id
from common.storage import ObjectPath, as_path

SUFFIXES = (".parquet", ".jsonl", ".json")
# a name's ending that makes it a file's name (`chat.jsnl`, `rows.csv`), not a hub dataset's
FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}$")
SCHEMA_SAMPLE_ROWS = 1000  # JSON sources: rows read to infer the schema

Rows = tuple[list[dict | None], pa.Table | None, list[dict]]  # rows, their Arrow table, read errors


class InputError(Exception):
    """Bad input found before any work: one line naming the path or id and what is wrong."""


class Source(ABC):
    """One corpus source, read by row ranges."""

    key: str  # stable identity recorded in output metadata
    stem: str  # short filesystem-safe name for output shard files

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able spec; `open_source(spec)` gives an equivalent source in another process."""

    @abstractmethod
    def num_rows(self) -> int: ...

    @abstractmethod
    def schema(self) -> pa.Schema:
        """Arrow schema of the rows."""

    @abstractmethod
    def read(self, start: int, stop: int) -> Rows:
        """Rows [start, stop) as dicts (None for a row that could not be parsed), the Arrow table
        they came from (columnar sources only, to keep pass-through column types exact), and one
        error {"row": absolute index, "field": "<line>" | "<row>", "reason": ...} per None row."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Cheap identity of the content, to tell whether a resumed job reads the same data."""


class FileSource(Source):
    """A corpus file; its key is the path as given."""

    kind: str

    def __init__(self, path: str | Path):
        self.path = as_path(path)  # a local path or an object-storage URI
        self.key = str(path)
        self.stem = self.path.stem

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.key}

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ParquetSource(FileSource):
    kind = "parquet"

    def num_rows(self) -> int:
        return pq.read_metadata(self.path).num_rows

    def schema(self) -> pa.Schema:
        return pq.read_schema(self.path)

    def read(self, start: int, stop: int) -> Rows:
        with pq.ParquetFile(self.path) as pf:
            table = _slice_parquet(pf, start, stop)
        return table.to_pylist(), table, []


class JSONLSource(FileSource):
    """One JSON object per line; blank lines are skipped and not counted."""

    kind = "jsonl"

    def _lines(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            yield from (line for line in f if line.strip())

    def num_rows(self) -> int:
        return sum(1 for _ in self._lines())

    def schema(self) -> pa.Schema:
        return _infer_schema(_parse_lines(islice(self._lines(), SCHEMA_SAMPLE_ROWS)))

    def read(self, start: int, stop: int) -> Rows:
        rows, errors = _check_rows(_parse_lines(islice(self._lines(), start, stop)), start, "<line>")
        return rows, None, errors


class JSONArraySource(FileSource):
    """A file holding one JSON array of objects, streamed item by item."""

    kind = "json"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._num_rows: int | None = None  # counting parses the whole file: do it once

    def _items(self) -> Iterator[object]:
        n = 0
        with self.path.open("rb") as f:
            try:
                # ijson picks its C backend (yajl2_c) when built; use_float: numbers as int/float, not Decimal
                for n, item in enumerate(ijson.items(f, "item", use_float=True), 1):  # noqa: B007 (n: the error message)
                    yield item
            except ijson.JSONError as e:
                reason = str(e).strip().splitlines()[0]  # yajl adds lines pointing at the spot
                raise InputError(f"{self.path}: broken JSON array after item {n}: {reason}") from e

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self._items())
        return self._num_rows

    def schema(self) -> pa.Schema:
        return _infer_schema(islice(self._items(), SCHEMA_SAMPLE_ROWS))

    def read(self, start: int, stop: int) -> Rows:
        rows, errors = _check_rows(islice(self._items(), start, stop), start, "<row>")
        return rows, None, errors


class DatasetSource(Source):
    """A memory-mapped `datasets.Dataset`, from `save_to_disk` or the hub."""

    def __init__(self, ds, spec: dict, key: str, stem: str):
        self._table_view = ds.with_format("arrow")  # slices come back as pa.Table
        self._ds, self._spec, self.key, self.stem = ds, spec, key, _safe(stem)

    def describe(self) -> dict:
        return dict(self._spec)

    def num_rows(self) -> int:
        return self._ds.num_rows

    def schema(self) -> pa.Schema:
        return self._ds.data.schema

    def read(self, start: int, stop: int) -> Rows:
        table = self._table_view[start:stop]
        return table.to_pylist(), table, []

    def fingerprint(self) -> dict:
        return {"fingerprint": self._ds._fingerprint, "revision": self._spec.get("revision")}


def open_sources(
    data: str, *, config: str | None = None, split: str | None = None, exclude: Path | None = None
) -> list[Source]:
    """Resolve `data` to its sources: a file, a folder (a saved dataset, or every corpus file under
    it), a glob, or a hub dataset id. Files under `exclude` (the job's output folder) are left out."""
    p = as_path(data)
    if isinstance(p, ObjectPath) and not any(c in data for c in "*?["):
        storage.check_bucket(p, "--data")  # endpoint, credentials, bucket: one line before anything else
    if p.is_dir() and _is_saved_dataset(p):
        return [_open_disk(data, split)]
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise InputError(f"{data}: unsupported file type {p.suffix!r}, expected {'/'.join(SUFFIXES)}")
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES]
    elif any(c in data for c in "*?["):
        files = storage.glob(data)
        files = [f for f in files if f.is_file() and f.suffix in SUFFIXES]
    elif looks_like_a_file(data):
        # a typo of a file's name must not become minutes of hub retries and a hub error
        known = "" if p.suffix in SUFFIXES else f"; corpus files end in {'/'.join(SUFFIXES)}"
        raise InputError(f"no such file: {data!r}{known} (a hub dataset id has the form org/name)")
    elif split_hub_id(data) and not data.endswith(SUFFIXES):
        return [_open_hub(data, config, split)]
    else:
        raise InputError(
            f"no corpus found at {data!r}: expected a {'/'.join(SUFFIXES)} file, a folder of them, a folder "
            "saved with datasets' save_to_disk, a glob pattern, or a hub dataset id (org/name[@revision])"
        )
    if exclude is not None:
        out = exclude.resolve()
        files = [f for f in files if not f.resolve().is_relative_to(out)]
    if not files:
        outside = f" outside {exclude}" if exclude else ""
        raise InputError(f"no {'/'.join(SUFFIXES)} files found at {data!r}{outside}")
    return [_open_file(f) for f in sorted(files)]


def looks_like_a_file(data: str) -> bool:
    """A name with no folder and no revision that ends in a file suffix (`chat.jsonl`, `chat.jsnl`): a
    file's name, never a hub dataset's. Hub ids without an org exist (`gsm8k`), but not with a suffix."""
    return "/" not in data and "@" not in data and bool(FILE_SUFFIX.search(data))


def open_source(spec: dict) -> Source:
    """Reopen a source from its `describe()` spec."""
    kind = spec["kind"]
    if kind == "parquet":
        return ParquetSource(spec["path"])
    elif kind == "jsonl":
        return JSONLSource(spec["path"])
    elif kind == "json":
        return JSONArraySource(spec["path"])
    elif kind == "disk":
        return _open_disk(spec["path"], spec["split"])
    elif kind == "hub":
        repo = spec["id"] + (f"@{spec['revision']}" if spec["revision"] else "")
        return _open_hub(repo, spec["config"], spec["split"])
    raise ValueError(f"unknown source kind {kind!r} in {spec}")


def _open_file(path: Path) -> FileSource:
    if path.suffix == ".parquet":
        return ParquetSource(path)
    if path.suffix == ".json" and _first_byte(path) == b"[":
        return JSONArraySource(path)
    return JSONLSource(path)  # .jsonl, and .json holding one object per line


def _first_byte(path: Path) -> bytes:
    """First non-whitespace byte of a file (b"" if there is none)."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    single = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    return single or (path / "dataset_dict.json").is_file()


def _open_disk(path: str, split: str | None) -> DatasetSource:
    import datasets  # ~1 s to import; only dataset sources need it

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise InputError(f"{path}: choose a split, one of {', '.join(splits)} (got {split!r})")
        ds = ds[split]
    else:
        split = None  # a single saved Dataset has no splits to pick from
    key = f"disk:{path}" + (f":{split}" if split else "")
    stem = Path(path).name + (f"_{split}" if split else "")
    return DatasetSource(ds, {"kind": "disk", "path": path, "split": split}, key, stem)


def _open_hub(repo: str, config: str | None, split: str | None) -> DatasetSource:
    """`datasets.load_dataset` on a hub id; its own environment (HF_HUB_OFFLINE, HF_HOME, ...)
    decides whether it may go online. Offline, `load_dataset` only finds datasets it prepared
    itself, so a snapshot in the hub cache (`hf download --repo-type dataset`) is tried next."""
    import datasets  # ~1 s to import; only dataset sources need it
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    split = split or "train"
    try:
        ds = datasets.load_dataset(repo_id, config, split=split, revision=revision)
    except Exception as e:
        try:
            folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
        except Exception:
            raise InputError(f"no local path or hub dataset {repo!r}: {_one_line(e)}") from e
        try:
            ds = datasets.load_dataset(folder, config, split=split)
        except Exception as snapshot_error:
            message = _one_line(snapshot_error)
            raise InputError(f"cannot load hub dataset {repo!r} from {folder}: {message}") from snapshot_error
    config = config or ds.info.config_name
    spec = {"kind": "hub", "id": repo_id, "config": config, "split": split, "revision": revision}
    stem = f"{repo_id.split('/')[-1]}_{config}_{split}"
    return DatasetSource(ds, spec, f"hf:{repo}:{config}:{split}", stem)


def _slice_parquet(pf: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """Read only the row groups that overlap [start, stop)."""
    groups, offset, first = [], 0, None
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(start - first, stop - start)


def _parse_lines(lines: Iterable[bytes]) -> Iterator[object]:
    """Each line's JSON value, or the ValueError it raised (a JSON value is never an exception)."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield e


def _check_rows(values: Iterable[object], start: int, field: str) -> tuple[list[dict | None], list[dict]]:
    """Keep JSON objects as rows; anything else becomes None plus an error naming its absolute row."""
    rows: list[dict | None] = []
    errors = []
    for i, value in enumerate(values, start):
        if isinstance(value, dict):
            rows.append(value)
            continue
        if isinstance(value, ValueError):
            reason = f"unreadable JSON: {value}"
        else:
            reason = f"not a JSON object but {type(value).__name__}"
        rows.append(None)
        errors.append({"row": i, "field": field, "reason": reason})
    return rows, errors


def _infer_schema(values: Iterable[object]) -> pa.Schema:
    """Schema of the JSON objects among `values`; names only (pa.null()) if a column mixes types."""
    rows = [v for v in values if isinstance(v, dict)]
    names = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys (from_pylist takes the first's)
    try:
        return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows]).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.schema([(n, pa.null()) for n in names])


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
