"""Where files live: a local path, or a URI of object storage (`s3://bucket/key`, `gs://bucket/key`).

`as_path(x)` gives a `pathlib.Path` for a local path (so local behaviour is exactly pathlib's) and an
`ObjectPath` for a URI: the part of `Path`'s interface the stages use (`/`, `name`, `exists`,
`is_dir`, `glob`, `unlink`, `open`, `read_text`, ...), backed by the pyarrow filesystem of the URI.
pyarrow's Parquet functions take either as they are (an ObjectPath's `__fspath__` is its URI, which
pyarrow opens itself), so a stage that reads or writes Parquet needs no second code path.

Credentials and endpoint come from the usual environment, read by pyarrow's own clients:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL (an S3-compatible server); for GCS, GOOGLE_APPLICATION_CREDENTIALS. Nothing is
asked for twice: Ray actors get the same variables (scorer.execute.init_ray).

Object stores have no rename: `replace(src, dst)` is a server-side copy then a delete; a writer
writes under a temporary name first (`TMP_PREFIX`), so a reader never sees half an object
(`write_json_atomic` here, the shards' writer in scorer/shards.py).
"""
from __future__ import annotations

import fnmatch
import glob as _glob
import io
import json
import os
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

from common.errors import ConfigError

URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_FILESYSTEMS: dict[tuple, object] = {}  # (scheme, bucket, endpoint) -> pyarrow filesystem
TMP_PREFIX = "."  # files being written: hidden from `OUT/*.parquet` (and from polars' glob)


class StorageError(ConfigError):
    """Object storage that cannot be used (endpoint, credentials, bucket): one line, exit code 2."""


def is_uri(path) -> bool:
    """A URI of a filesystem other than the local one (`file://` is local)."""
    m = URI.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def as_path(path) -> Path | "ObjectPath":
    """A local path as `pathlib.Path`, a URI as `ObjectPath`."""
    if isinstance(path, (Path, ObjectPath)):
        return path
    s = str(path)
    if s.lower().startswith("file://"):
        return Path(s[len("file://"):])
    return ObjectPath(s) if is_uri(s) else Path(s)


def filesystem(scheme: str, bucket: str):
    """The pyarrow filesystem of `scheme://bucket`, made once per process (pyarrow reads the environment)."""
    import pyarrow.fs as pafs

    key = (scheme, bucket, endpoint())  # the environment may name another endpoint later (tests do)
    if key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[key] = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
        except (OSError, ValueError) as e:
            raise StorageError(f"{scheme}://{bucket}: pyarrow cannot open this filesystem ({_one_line(e)})") from None
    return _FILESYSTEMS[key]


class _Reader(io.RawIOBase):
    """A pyarrow input stream as a raw Python stream (for `io.BufferedReader`: lines, iteration)."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


class ObjectPath:
    """A file or folder (key prefix) in object storage, with the part of `Path`'s interface the stages use."""

    def __init__(self, uri: str):
        scheme, rest = uri.split("://", 1)
        self.scheme = scheme.lower()
        self.key = rest.strip("/")  # bucket/key..., pyarrow's path
        self.uri = f"{self.scheme}://{self.key}"

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def fs(self):
        return filesystem(self.scheme, self.bucket)

    # names
    def __truediv__(self, name) -> "ObjectPath":
        return ObjectPath(f"{self.uri}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.scheme}://{self.key.rsplit('/', 1)[0]}") if "/" in self.key else self

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def resolve(self) -> "ObjectPath":
        return self

    absolute = resolve

    def is_relative_to(self, other) -> bool:
        return isinstance(other, ObjectPath) and (self.uri == other.uri or self.uri.startswith(other.uri + "/"))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:  # pyarrow opens the URI itself; never given to open() here
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and self.uri == other.uri

    def __lt__(self, other) -> bool:
        return self.uri < str(other)

    def __hash__(self) -> int:
        return hash(self.uri)

    # what is there
    def info(self):
        try:
            return self.fs.get_file_info(self.key)
        except OSError as e:
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.Directory

    def stat(self):
        info = self.info()
        if info.size is None:
            raise FileNotFoundError(self.uri)
        return SimpleNamespace(st_size=info.size, st_mtime_ns=info.mtime_ns or 0)

    def _listing(self, recursive: bool) -> list:
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self.key, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None

    def iterdir(self):
        return iter(sorted(ObjectPath(f"{self.scheme}://{i.path}") for i in self._listing(False)))

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Entries whose path below this folder matches `pattern` (`**` spans folders)."""
        deep = "/" in pattern or "**" in pattern
        found = []
        for i in self._listing(deep):
            rel = i.path[len(self.key) + 1:]
            if (fnmatch.fnmatchcase(rel, pattern)
                    or (pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]))):
                found.append(ObjectPath(f"{self.scheme}://{i.path}"))
        return sorted(found)

    def rglob(self, pattern: str) -> list["ObjectPath"]:
        return [p for p in (ObjectPath(f"{self.scheme}://{i.path}") for i in self._listing(True))
                if fnmatch.fnmatchcase(p.name, pattern)]

    # reading and writing
    def open(self, mode: str = "rb", **_):
        try:
            if mode == "rb":
                return io.BufferedReader(_Reader(self.fs.open_input_stream(self.key)), 1 << 20)
            if mode == "wb":
                return self.fs.open_output_stream(self.key)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"{self.uri}: {_one_line(e)}") from None
        raise ValueError(f"{self.uri}: mode {mode!r} (object storage: rb or wb)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object storage has no folders, a key's prefix exists once a key under it does."""


def replace(src, dst) -> None:
    """`os.replace` for local paths; a server-side copy, then a delete, in object storage (no rename there:
    `dst` changes from its old to its new content in one step, `src` lingers until the delete)."""
    if isinstance(src, ObjectPath) or isinstance(dst, ObjectPath):
        src, dst = as_path(src), as_path(dst)
        dst.fs.copy_file(src.key, dst.key)
        src.unlink(missing_ok=True)
    else:
        os.replace(src, dst)


def write_json_atomic(obj, path) -> None:
    """`obj` as indented JSON, written under a temporary name, then renamed: a reader (a rerun, another
    stage) never sees half a file."""
    path = as_path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    replace(tmp, path)


def append_json_line(obj, path) -> None:
    """`obj` as one JSON line at the end of `path` (made when missing): a run's line in a history file.
    Object storage has no append: the object is read and written whole (one writer holds OUT's lease)."""
    path = as_path(path)
    line = json.dumps(obj) + "\n"
    if isinstance(path, ObjectPath):
        path.write_text((path.read_text() if path.exists() else "") + line)
    else:
        with open(path, "a") as f:
            f.write(line)


def run_id() -> str:
    """A name for this run in history files and shard metadata: its start (UTC) and process id."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{os.getpid()}"


def glob(pattern: str) -> list:
    """Files and folders matching a glob: local (`glob.glob`, `**` recursive) or in object storage."""
    if not is_uri(pattern):
        return [Path(f) for f in _glob.glob(pattern, recursive=True)]
    root = ObjectPath(pattern)
    parts = root.key.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = ObjectPath(f"{root.scheme}://{'/'.join(parts[:fixed])}")
    check_bucket(base, "--data")
    return base.glob("/".join(parts[fixed:]))


def local_file(path, name: str) -> Path:
    """A local file for what cannot live in object storage (a log appended to while a stage runs):
    `path/name` for a local folder, else `$TMPDIR/pear/<scheme>/<bucket>/<key>/name`."""
    p = as_path(path)
    if isinstance(p, Path):
        return p / name
    import tempfile

    return Path(tempfile.gettempdir()) / "pear" / p.scheme / p.key / name


# ---- one-line errors before any work -----------------------------------------------------------

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def s3_credentials_problem(env=os.environ) -> str | None:
    """What is wrong with the AWS credentials this environment offers, None when some source is there:
    the variables, a profile or credentials file, or an instance role (the metadata endpoint answers)."""
    if env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"
    if any(env.get(v) for v in CREDENTIAL_VARIABLES):
        return None
    files = (env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(Path(f).expanduser().is_file() for f in files):
        return None
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true" and _answers("169.254.169.254", 80, 0.3):
        return None
    return ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a credentials "
            "file, or run where an instance role provides them)")


def endpoint(env=os.environ) -> str | None:
    """The S3-compatible endpoint the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)."""
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def check_bucket(path: ObjectPath, flag: str) -> None:
    """StorageError, one line naming `flag` and the URI, when the endpoint cannot be reached, there are
    no credentials, or the bucket does not exist; nothing is written."""
    import pyarrow.fs as pafs

    if path.scheme == "s3":
        problem = s3_credentials_problem()
        if problem:
            raise StorageError(f"{flag} {path.uri}: {problem}")
        url = endpoint()
        if url:
            u = urlparse(url if "://" in url else f"http://{url}")
            port = u.port or (443 if u.scheme == "https" else 80)
            if not _answers(u.hostname or "", port, 5):
                raise StorageError(f"{flag} {path.uri}: cannot reach the object store at AWS_ENDPOINT_URL={url}; "
                                   "start it, or fix or unset AWS_ENDPOINT_URL")
    try:
        bucket = path.fs.get_file_info(path.bucket)
    except OSError as e:
        raise StorageError(f"{flag} {path.uri}: {_one_line(e)}") from None
    if bucket.type == pafs.FileType.NotFound:
        raise StorageError(f"{flag} {path.uri}: bucket {path.bucket!r} does not exist (or these credentials "
                           "cannot see it); create it first")


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
