"""Corpus, shards and exports in object storage: a real S3-compatible server (moto's server mode,
started here as a process), reached through pyarrow and polars as a user's bucket would be."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.fs as pafs
import pytest

from jobs import Job
from common.config import ConfigError
from common.lock import locked
from common.storage import as_path
from pipelines.score import main as score_main
from scorer.export import ExportConfig, export
from scorer.job import ScoreConfig, run
from scorer.report import main as inspect_main
from scorer.reweight import main as reweight_main
from scorer.shards import list_shards, read_meta
from scorer.view import main as view_main

ROOT = Path(__file__).resolve().parents[1]
ROWS = 48
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on this machine and the environment that points at it; returns a
    function that makes a new empty bucket and gives its s3:// URI."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the S3 server did not start"
            time.sleep(0.2)
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    made = []

    def bucket() -> str:
        name = f"pear-{uuid.uuid4().hex[:16]}"  # unique across servers: polars keeps a client per bucket name
        fs.create_dir(name)
        made.append(name)
        return f"s3://{name}"

    bucket.port = port
    yield bucket
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def upload(frame: pl.DataFrame, uri: str) -> None:
    """A corpus file in the bucket, written through pyarrow as any other program would."""
    import pyarrow.parquet as pq

    pq.write_table(frame.to_arrow(), uri)


def score(world, data, out, **kw) -> dict:
    cfg = dict(data=str(data), out=str(out), target=str(world / "target"), behavior="none", executor="local",
               backend="torch", rows_per_shard=16)
    return run(ScoreConfig(**{**cfg, **kw}), progress=False)


def rows_of(out) -> pl.DataFrame:
    return pl.read_parquet(f"{out}/*.parquet").sort("id")


def same_rows(a: pl.DataFrame, b: pl.DataFrame, tol: float = 0.0) -> None:
    """The same rows; `tol`: the largest difference of a logprob or weight (0: equal; units of other sizes
    are batched otherwise, which moves float32 results by about 1e-7)."""
    assert len(a) == len(b) and a["id"].to_list() == b["id"].to_list()
    for col in ("input_ids", "prompt_len", "response_spans"):
        assert a[col].to_list() == b[col].to_list(), col
    for col in ("target_logprobs", "behavior_logprobs", "weights"):
        diff = max(np.abs(np.array(x) - np.array(y)).max() for x, y in zip(a[col], b[col]))
        assert diff <= tol, (col, diff)


def objects(uri: str) -> list[str]:
    p = as_path(uri)
    return sorted(i.path for i in p.fs.get_file_info(pafs.FileSelector(p.key, recursive=True, allow_not_found=True)))


@pytest.fixture(scope="module")
def local_run(world, tmp_path_factory):
    """The first rows of the corpus, scored into a local folder: what object storage must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    corpus = pl.read_parquet(world / "corpus.parquet").head(ROWS)
    corpus.write_parquet(tmp / "corpus.parquet")
    score(world, tmp / "corpus.parquet", tmp / "scores")
    return corpus, tmp / "scores"


def test_scoring_from_and_to_a_bucket_is_the_local_run_and_resumes(world, s3, local_run):
    corpus, local = local_run
    bucket = s3()
    data, out = f"{bucket}/corpus/c.parquet", f"{bucket}/scores"
    upload(corpus, data)
    s = score(world, data, out)
    assert (s["rows_in"], s["rows_written"] + s["rows_rejected"], s["this_run"]["shards_scored"]) == (ROWS, ROWS, 3)
    # polars reads the shards straight from the URI (credentials and endpoint from the environment)
    same_rows(rows_of(out), rows_of(local))
    assert json.loads(as_path(f"{out}/summary.json").read_text())["rows_written"] == s["rows_written"]
    assert pl.read_parquet(f"{out}/rejects/rejects.parquet").height == s["rows_rejected"]
    assert read_meta(list_shards(out)[0])["made_on"]["host"] == socket.gethostname()
    assert not [o for o in objects(bucket) if "tmp" in o or o.endswith("/.lock")]  # nothing half-written, lease gone

    # a rerun scores nothing; rows renamed in the second unit (rows 16-31) are scored again, only they
    assert score(world, data, out)["this_run"]["shards_scored"] == 0
    renamed = corpus.with_columns(pl.when(pl.int_range(pl.len()).is_between(20, 23)).then(pl.col("id") + "-new")
                                  .otherwise(pl.col("id")).alias("id"))
    upload(renamed, data)
    s = score(world, data, out)
    assert s["this_run"]["shards_scored"] == 1 and rows_of(out)["id"].to_list() == sorted(renamed["id"].to_list())

    # a second writer is refused at once, naming the holder of the lease
    with locked(out):
        with pytest.raises(ConfigError, match=r"in use by another job \(.*:%d:" % os.getpid()):
            score(world, data, out)


@pytest.mark.slow(seconds=25)
def test_a_killed_driver_on_a_bucket_resumes_to_the_same_rows(world, s3, local_run, tmp_path):
    corpus, local = local_run
    bucket = s3()
    data, out = f"{bucket}/c.parquet", f"{bucket}/scores"
    upload(corpus, data)
    cmd = [sys.executable, "-m", "pipelines.score", "--data", data, "--out", out, "--target", str(world / "target"),
           "--behavior", "none", "--backend", "torch", "--executor", "local", "--rows-per-shard", "2"]
    # as `make score` runs it: quiet, its log on this machine (not in a folder named "s3:")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEAR_QUIET": "1"}
    with Job(cmd, tmp_path / "job.log", cwd=tmp_path, env=env) as job:
        job.wait_until(lambda: len(list_shards(out) if as_path(out).is_dir() else []) >= 2, "two shards were written")
        job.kill()
    done = len(list_shards(out))
    assert 2 <= done < ROWS // 2, f"the kill did not land part-way: {done} of {ROWS // 2} shards"
    assert not as_path(f"{out}/summary.json").exists()

    # the rerun takes over the lease of the dead driver (same host, its pid gone) and scores the rest
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(as_path(f"{out}/summary.json").read_text())
    rerun = json.loads(as_path(f"{out}/history.jsonl").read_text().splitlines()[-1])
    assert rerun["shards_scored"] == ROWS // 2 - done and summary["shards"] == ROWS // 2
    same_rows(rows_of(out), rows_of(local), tol=1e-5)
    assert not [o for o in objects(bucket) if "tmp" in o]  # no partial shard left behind
    assert not (tmp_path / "s3:").exists()


def test_reweight_inspect_export_and_sft_read_and_write_the_bucket(world, s3, local_run, tmp_path):
    from test_sft import cfg_for, metrics

    from train.sft import train

    corpus, _ = local_run
    bucket = s3()
    out = f"{bucket}/scores"
    upload(corpus, f"{bucket}/c.parquet")
    score(world, f"{bucket}/c.parquet", out)
    local = tmp_path / "scores"
    pafs.copy_files(out, str(local))  # the same shards in a local folder: every stage must agree on them

    # reweight: the same new weights there as here (`make reweight` runs the module as a program)
    proc = subprocess.run([sys.executable, "-m", "scorer.reweight", "--scores", out, "--variant", "block"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "reweighted" in proc.stdout, proc.stderr[-2000:]
    assert reweight_main(["--scores", str(local), "--variant", "block"]) == 0
    same_rows(rows_of(out), rows_of(local))
    assert all(read_meta(p)["variant"] == "block" for p in list_shards(out))

    # all or nothing: an unreadable shard stops it before any shard changes, and no staged copy stays
    before = rows_of(out)
    as_path(f"{out}/zz-broken.parquet").write_bytes(b"PAR1 not a parquet file")
    assert reweight_main(["--scores", out, "--variant", "sequence"]) == 2
    as_path(f"{out}/zz-broken.parquet").unlink()
    same_rows(rows_of(out), before)
    assert all(read_meta(p)["variant"] == "block" for p in list_shards(out))
    assert not [o for o in objects(bucket) if "reweight-tmp" in o]

    # inspect: the histogram is written beside the shards
    assert inspect_main(["--scores", out]) == 0 and as_path(f"{out}/log_weights.png").read_bytes()[:4] == b"\x89PNG"
    # view: the page too, with the rows a local page shows
    assert view_main(["--scores", out, "--n", "2"]) == 0
    assert view_main(["--scores", str(local), "--n", "2"]) == 0
    there, here = [[r["ids"] for r in json.loads(re.search(r'id="data">(.*?)</script>', as_path(f"{f}/weights.html")
                                                           .read_text(), re.S).group(1))["rows"]] for f in (out, local)]
    assert there == here and len(there) >= 2

    # export from the bucket to the bucket: the files a local export writes
    r = export(ExportConfig(scores=out, out=f"{bucket}/export", convention="trl", progress=False))
    export(ExportConfig(scores=str(local), out=str(tmp_path / "export"), convention="trl", progress=False))
    assert r["rows"] == len(before)
    there, here = rows_of(f"{bucket}/export"), rows_of(tmp_path / "export")
    assert there.columns == here.columns and there.to_dicts() == here.to_dicts()

    # SFT from shards in the bucket trains exactly as from the same shards here
    a = train(cfg_for(out, tmp_path / "sft-bucket", epochs=1))
    b = train(cfg_for(local, tmp_path / "sft-local", epochs=1))
    assert a["steps"] == b["steps"] > 0
    timing = ("tokens_per_s", "seconds")
    same = lambda out: [{k: v for k, v in m.items() if k not in timing} for m in metrics(out)]
    assert same(tmp_path / "sft-bucket") == same(tmp_path / "sft-local")
    assert json.loads((tmp_path / "sft-bucket" / "train_summary.json").read_text())["scores"] == out

    # evaluation's held-out check finds the SFT prompts in the bucket, as it finds them here
    from train.eval import seen_prompt_sets
    from train.rollout import training_prompt_texts

    [there], [here] = seen_prompt_sets(tmp_path / "sft-bucket"), seen_prompt_sets(tmp_path / "sft-local")
    assert str(there) == out and training_prompt_texts(str(there)) == training_prompt_texts(str(here)) != set()


def test_unusable_object_storage_is_one_line_and_exit_2(world, s3, local_run, tmp_path, capsys, monkeypatch):
    corpus, local = local_run
    bucket = s3()
    upload(corpus, f"{bucket}/c.parquet")
    monkeypatch.chdir(tmp_path)
    base = ["--target", str(world / "target"), "--behavior", "none", "--executor", "local"]

    def fails(argv, words, main=score_main):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err

    fails(["--data", f"{bucket}/c.parquet", "--out", "s3://no-such-bucket/scores", *base],
          "'no-such-bucket' does not exist")
    fails(["--data", "s3://no-such-bucket/c.parquet", "--out", f"{bucket}/scores", *base],
          "'no-such-bucket' does not exist")
    fails(["--scores", "s3://no-such-bucket/scores", "--variant", "block"], "not found", main=reweight_main)
    fails(["--scores", str(local), "--out", "s3://no-such-bucket/export"], "'no-such-bucket' does not exist",
          main=__import__("scorer.export", fromlist=["main"]).main)
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
        fails(["--data", f"{bucket}/c.parquet", "--out", f"{bucket}/scores", *base], "cannot reach the object store")
    with monkeypatch.context() as m:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            m.delenv(k)
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        fails(["--data", f"{bucket}/c.parquet", "--out", f"{bucket}/scores", *base], "no AWS credentials")
    assert objects(bucket) == [f"{bucket[5:]}/c.parquet"]  # nothing written
    assert not list(tmp_path.iterdir())
