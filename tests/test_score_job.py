"""The scoring job end to end: shards, rejects, metadata, resume, reweight, errors."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError
from jobs import Job
from pipelines.score import main
from scorer.job import ScoreConfig, run
from scorer.shards import CORE_NAMES, list_shards, read_meta
from scorer.weights import WeightParams, ragged_weights

ROOT = Path(__file__).resolve().parents[1]


def world_rows(world, n):
    return pl.read_parquet(world / "corpus.parquet").head(n)


def cfg_for(world, data, out, **kw):
    base = dict(data=str(data), out=str(out), target=str(world / "target"), behavior=str(world / "behavior"),
                executor="local", rows_per_shard=16, backend="torch")
    return ScoreConfig(**{**base, **kw})


@pytest.fixture
def mixed_corpus(world, tmp_path):
    """40 good rows from the world corpus (Parquet) and a JSONL of bad and behavior-less rows."""
    good = world_rows(world, 40)
    good.write_parquet(tmp_path / "good.parquet")
    src = good.row(0, named=True)
    n_resp = len(src["response_ids"])
    extra = [
        {"id": "no-behavior", "prompt": src["prompt"], "response": src["response"],
         "response_ids": src["response_ids"]},
        {"id": "chat", "messages": [{"role": "user", "content": "1 + 2 ="},
                                    {"role": "assistant", "content": "1+2=3\nAnswer: 3"}]},
        {"id": "no-response", "prompt": "q"},
        {"id": "empty", "prompt": "q", "response": ""},
        {"id": "short-logprobs", "prompt": src["prompt"], "response_ids": src["response_ids"],
         "response": src["response"], "behavior_logprobs": src["behavior_logprobs"][:-1]},
        {"id": "nan", "prompt": src["prompt"], "response_ids": src["response_ids"], "response": src["response"],
         "behavior_logprobs": [float("nan")] * n_resp},
        {"id": "long", "prompt": src["prompt"], "response": " ".join(str(i) for i in range(700))},
    ]
    with open(tmp_path / "extra.jsonl", "w") as f:
        for r in extra:
            f.write(json.dumps(r) + "\n")
    return tmp_path


def read_rows_sorted(out):
    return pl.read_parquet(f"{out}/*.parquet").sort("id")


def test_job_writes_shards_rejects_and_summary(world, mixed_corpus, tmp_path):
    out = tmp_path / "scores"
    summary = run(cfg_for(world, mixed_corpus, out, backend="vllm"), progress=False)

    assert summary["rows_in"] == 47
    assert summary["rows_written"] + summary["rows_rejected"] == 47
    assert summary["rows_rejected"] == 5
    rejects = pl.read_parquet(out / "rejects" / "rejects.parquet")
    assert dict(zip(rejects["id"], rejects["field"])) == {
        "no-response": "response", "empty": "response", "short-logprobs": "behavior_logprobs",
        "nan": "behavior_logprobs", "long": "response"}
    assert all(rejects["reason"].str.len_chars() > 5)

    df = read_rows_sorted(out)
    assert df.columns[: len(CORE_NAMES)] == CORE_NAMES and "task" in df.columns  # pass-through kept
    assert len(df) == 42 and df["id"].n_unique() == 42
    shards = list_shards(out)
    assert [s.name for s in shards] == ["extra-00000.parquet"] + [f"good-0000{i}.parquet" for i in range(3)]
    meta = read_meta(shards[1])
    for key in ("schema_version", "variant", "gamma", "block_size", "delta_clip", "log_weight_clip", "target_model",
                "behavior", "tokenizer_sha256", "backend", "version"):
        assert key in meta
    assert meta["behavior"]["source"] == "column" and read_meta(shards[0])["behavior"]["source"] == "model"
    assert pq.read_metadata(shards[1]).row_group(0).column(0).compression == "ZSTD"

    # ids the trainer will use: the prompt ids, then the generator's sampled response ids
    good = world_rows(world, 40).sort("id")
    first = df.filter(pl.col("id") == good["id"][0]).row(0, named=True)
    assert first["input_ids"][first["prompt_len"]:] == good["response_ids"][0].to_list()
    assert first["behavior_logprobs"] == pytest.approx(good["behavior_logprobs"][0].to_list(), abs=1e-6)

    # the behavior model scored the row without logprobs: same numbers as the sampler recorded
    nb = df.filter(pl.col("id") == "no-behavior").row(0, named=True)
    sampled = world_rows(world, 1)["behavior_logprobs"][0].to_list()
    assert np.abs(np.array(nb["behavior_logprobs"]) - sampled).max() < 1e-3

    # stored weights are the weight module's, for every row
    w, _ = ragged_weights([np.array(x) for x in df["target_logprobs"]], [np.array(x) for x in df["behavior_logprobs"]],
                          WeightParams("token"))
    for stored, expected in zip(df["weights"], w):
        assert stored.to_list() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)

    s = json.loads((out / "summary.json").read_text())
    assert s["variants"]["token"]["tokens"] == sum(len(x) for x in df["weights"])
    assert set(s["variants"]) == {"sequence", "token", "block", "none"}

    # rerun: nothing to do, same rows
    again = run(cfg_for(world, mixed_corpus, out, backend="vllm"), progress=False)
    assert again["this_run"]["shards_scored"] == 0 and again["rows_written"] == 42
    # other settings on the same folder are refused, not mixed in
    with pytest.raises(ConfigError, match="other settings"):
        run(cfg_for(world, mixed_corpus, out, target=str(world / "behavior")), progress=False)


def test_torch_and_vllm_backends_agree(world):
    from transformers import AutoTokenizer

    from scorer.engines import TorchScorer, VllmScorer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    rows = world_rows(world, 64)
    ids, plens = [], []
    for r in rows.iter_rows(named=True):
        p = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
        ids.append(list(p) + r["response_ids"])
        plens.append(len(p))
    a = TorchScorer(str(world / "target"), token_budget=2048).score(ids, plens)
    v = VllmScorer(str(world / "target"), max_model_len=512)
    try:
        b = v.score(ids, plens)
    finally:
        v.close()
    diff = max(np.abs(x - y).max() for x, y in zip(a, b))
    assert diff < 1e-3, diff
    assert [len(x) for x in a] == [len(r) for r in rows["response_ids"]]


def test_bad_paths_and_tokenizers_exit_2_and_write_nothing(world, mixed_corpus, tmp_path, capsys):
    from pipelines.world import build_tokenizer

    out = tmp_path / "never"
    common = ["--out", str(out), "--executor", "local", "--target", str(world / "target")]
    assert main(["--data", str(tmp_path / "missing.parquet")] + common) == 2
    assert "no corpus found at" in capsys.readouterr().err
    assert main(["--data", str(mixed_corpus), "--target", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"target '{tmp_path / 'nope'}' not found" in capsys.readouterr().err
    assert main(["--data", str(mixed_corpus), "--out", str(out)]) == 2
    assert "TARGET= (--target) is required with DATA=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no target model given"):  # the job's own check, called directly
        run(ScoreConfig(data=str(mixed_corpus), out=str(out), executor="local"))
    assert main(["--data", str(mixed_corpus), "--target", str(world / "target"), "--out", str(out),
                 "--rows-per-shard", "0"]) == 2
    assert "--rows-per-shard must be at least 1" in capsys.readouterr().err

    other = tmp_path / "other_behavior"
    shutil.copytree(world / "behavior", other)
    build_tokenizer(["a completely different corpus of words"] * 10, 300, other)
    # the good file alone: the model folder lies in the corpus folder, and its config.json is no corpus
    assert main(["--data", str(mixed_corpus / "good.parquet"), "--behavior", str(other)] + common) == 2
    assert "another tokenizer" in capsys.readouterr().err

    no_column = tmp_path / "no-column.jsonl"
    no_column.write_text(json.dumps({"prompt": "1 + 2 =", "response": "3"}) + "\n")
    for behavior in ([], ["--behavior", "none"]):
        assert main(["--data", str(no_column)] + behavior + common) == 2
        err = capsys.readouterr().err
        assert "no behavior_logprobs column" in err and "BEHAVIOR=" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow(seconds=90)
def test_killed_ray_run_resumes_to_the_same_rows(world, tmp_path):
    data = tmp_path / "corpus.parquet"
    world_rows(world, 256).write_parquet(data)
    args = ["--data", str(data), "--target", str(world / "target"), "--behavior", str(world / "behavior"),
            "--rows-per-shard", "8", "--backend", "vllm"]
    cmd = [sys.executable, "-m", "pipelines.score"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    killed = tmp_path / "killed"
    with Job(cmd + args + ["--out", str(killed)], tmp_path / "job.log", cwd=ROOT, env=env) as job:
        job.wait_until(lambda: len(list(killed.glob("*.parquet"))) >= 3, "three shards were written", every=0.05)
        job.kill()
    # an actor may still finish the unit in hand before Ray notices its driver is gone
    done, stable_since = -1, time.time()
    while time.time() - stable_since < 3:
        n = len(list(killed.glob("*.parquet")))
        if n != done:
            done, stable_since = n, time.time()
        time.sleep(0.2)
    assert 3 <= done < 32, f"kill did not land part-way: {done} of 32 shards"
    assert not (killed / "summary.json").exists()

    # the rerun as `make score` runs it (PEAR_QUIET=1): Ray's and vLLM's output goes to OUT/score.log
    resumed = subprocess.run(cmd + args + ["--out", str(killed)], cwd=ROOT, env={**env, "PEAR_QUIET": "1"},
                             timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rerun = json.loads((killed / "history.jsonl").read_text().splitlines()[-1])
    assert rerun["shards_scored"] == 32 - done
    assert_quiet(resumed, killed / "score.log")

    whole = tmp_path / "whole"
    run(ScoreConfig(data=str(data), out=str(whole), target=str(world / "target"), behavior=str(world / "behavior"),
                    rows_per_shard=8, backend="vllm", executor="local"), progress=False)
    a, b = read_rows_sorted(killed), read_rows_sorted(whole)
    assert len(a) == 256 and a["id"].n_unique() == 256
    assert a["id"].to_list() == b["id"].to_list()
    assert a["input_ids"].to_list() == b["input_ids"].to_list()
    for col in ("target_logprobs", "behavior_logprobs", "weights"):
        diff = max(np.abs(np.array(x) - np.array(y)).max() for x, y in zip(a[col], b[col]))
        assert diff < 1e-5, (col, diff)
    assert not list(killed.glob(".*tmp*"))  # no half-written file left visible


NOISE = ("Ray instance", "INFO", "Triton", "Loading safetensors", "Loading weights", "core_worker", "Warning",
         "WARNING")


def assert_quiet(proc, log_path):
    """The terminal had the stage's own lines only (log lines, progress bar, summary); the rest is in the log."""
    terminal = proc.stdout + proc.stderr
    assert "pear.scorer" in proc.stderr and "scoring shards" in proc.stderr and "rows in 256" in proc.stdout
    assert proc.stderr.count(f"other libraries' output: {log_path}") == 1
    assert not [word for word in NOISE if word in terminal], terminal
    log = log_path.read_text()
    assert "Ray instance" in log and "vllm" in log.lower() and "pear.scorer" in log


def test_the_old_scoring_module_refuses_rather_than_passing_silently():
    """`python -m scorer.job` was the scoring command before pipelines.score became the only one."""
    proc = subprocess.run([sys.executable, "-m", "scorer.job", "--data", "x.jsonl"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: python -m scorer.job is no longer a command; run python -m pipelines.score (same flags)"]
