"""A user's own corpus and settings: what is refused before any work (one line, exit 2), what is read,
and what a stage says when something else ends it."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import parse
from scorer import report as inspect_cli
from scorer.corpus import RowError, encode_row
from pipelines.score import main as score_main
from scorer.job import ScoreConfig, run
from scorer.reweight import main as reweight_main
from scorer.shards import list_shards, read_meta
from scorer.stats import WeightStats
from scorer.summary import format_summary
from scorer.weights import WeightParams
from tiny_tokenizers import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def encode(row, tok):
    return encode_row(row, 0, "test", tok, max_len=4096, truncate=False, append_eos=True, vocab_size=len(tok))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def score_args(world, data, out, *extra, executor="local"):
    return ["--data", str(data), "--out", str(out), "--target", str(world / "target"), "--behavior", "none",
            "--executor", executor, "--backend", "torch", "--rows-per-shard", "16", *extra]


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory):
    """20 rows of the embedded corpus scored with the default settings (copy before changing it)."""
    tmp = tmp_path_factory.mktemp("user_errors")
    pl.read_parquet(world / "corpus.parquet").head(20).write_parquet(tmp / "corpus.parquet")
    run(ScoreConfig(data=str(tmp / "corpus.parquet"), out=str(tmp / "s"), target=str(world / "target"),
                    behavior="none", executor="local", backend="torch", rows_per_shard=16), progress=False)
    return tmp


def copy_scores(scored, tmp_path) -> Path:
    shutil.copytree(scored / "s", tmp_path / "s", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "s"


# ---- item 4: an empty assistant turn is an empty response ---------------------------------------

@pytest.mark.parametrize("content", ["", "  \n", [{"type": "text", "text": ""}]])
def test_an_empty_assistant_turn_is_rejected_like_an_empty_response(content):
    tok = tiny_tokenizer("qwen2_5")
    with pytest.raises(RowError) as e:
        encode({"prompt": "What is 2 plus 3?", "response": content if isinstance(content, str) else ""}, tok)
    assert e.value.field == "response" and "empty" in e.value.reason
    # the template would add `<|im_end|>` to the empty turn, and that one token would be trained
    for messages in ([{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": content}],
                     [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": content},
                      {"role": "user", "content": "and 5+5?"}, {"role": "assistant", "content": "10"}]):
        with pytest.raises(RowError) as e:
            encode({"messages": messages}, tok)
        assert e.value.field == "messages" and "message 1 (assistant) is empty" in e.value.reason


def test_an_assistant_turn_that_only_calls_a_tool_is_still_scored():
    tok = tiny_tokenizer("qwen2_5")
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    ex = encode({"messages": [{"role": "user", "content": "2+3?"},
                              {"role": "assistant", "content": "", "tool_calls": [call]},
                              {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]}, tok)
    assert len(ex.spans) == 2 and "add" in tok.decode(ex.input_ids[slice(*ex.spans[0])])


# ---- item 8: columns checked before any model loads; ShareGPT read ------------------------------

def test_a_corpus_without_known_columns_exits_2_naming_them_before_any_model(tmp_path, capsys):
    data = tmp_path / "sharegpt-like.jsonl"
    data.write_text(json.dumps({"id": "a", "dialogue": [{"speaker": "u", "text": "hi"}], "source": "x"}) + "\n")
    # the target does not exist: the corpus is refused before the target is looked at
    args = ["--data", str(data), "--out", str(tmp_path / "s"), "--target", str(tmp_path / "no-model"),
            "--executor", "local"]
    assert score_main(args) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "columns found: dialogue, id, source" in err and "prompt + response" in err and "messages" in err
    assert not (tmp_path / "s").exists()


def test_sharegpt_conversations_are_scored_as_messages(world, tmp_path):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "1 + 2 ="},
             {"from": "gpt", "value": "1+2=3\nAnswer: 3"}]
    tok = tiny_tokenizer("qwen2_5")
    messages = [{"role": r, "content": t["value"]} for r, t in zip(("system", "user", "assistant"), turns)]
    assert encode({"conversations": turns}, tok).input_ids == encode({"messages": messages}, tok).input_ids
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "conversations": turns}) + "\n" for i in range(3)))
    s = run(ScoreConfig(data=str(data), out=str(tmp_path / "s"), target=str(world / "target"),
                        behavior=str(world / "behavior"), executor="local", backend="torch"), progress=False)
    assert (s["rows_in"], s["rows_written"], s["rows_rejected"]) == (3, 3, 0)
    out = pl.read_parquet(f"{tmp_path / 's'}/*.parquet")
    assert out["conversations"].to_list()[0] == turns  # passed through as it was


# ---- item 9: an empty corpus ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet"])
def test_an_empty_corpus_exits_2_and_writes_nothing(tmp_path, capsys, name):
    data = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), data)
    else:
        data.write_text("\n")
    args = ["--data", str(data), "--out", str(tmp_path / "s"), "--target", str(tmp_path / "no-model"),
            "--executor", "local"]
    assert score_main(args) == 2
    assert "no rows to score" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


# ---- item 7: a model folder without a tokenizer, Ray, and any other exception --------------------

def test_a_model_folder_without_a_tokenizer_is_one_line_and_exit_2(world, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in (world / "target").iterdir():
        if f.is_file() and f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, model / f.name)
    data = tmp_path / "c.parquet"
    pl.read_parquet(world / "corpus.parquet").head(2).write_parquet(data)
    # as `make score` runs it: quiet, so that anything not printed on purpose goes to the log
    proc = subprocess.run([sys.executable, "-m", "pipelines.score", "--data", str(data), "--target", str(model),
                           "--out", str(tmp_path / "s"), "--executor", "local"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PEAR_QUIET": "1"})
    assert proc.returncode == 2, proc.stderr
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "has no loadable tokenizer" in err[0] and str(model) in err[0]


@pytest.mark.timeout(240)
def test_an_unreachable_ray_address_exits_2_naming_it(world, tmp_path):
    data = tmp_path / "c.parquet"
    pl.read_parquet(world / "corpus.parquet").head(2).write_parquet(data)
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    proc = subprocess.run([sys.executable, "-m", "pipelines.score",
                           *score_args(world, data, tmp_path / "s", executor="ray")],
                          cwd=ROOT, capture_output=True, text=True, timeout=200,
                          env={**os.environ, "PEAR_QUIET": "1", "RAY_ADDRESS": address})
    assert proc.returncode == 2, proc.stderr
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"cannot reach the Ray cluster at RAY_ADDRESS={address}" in err[0]
    assert "scoring shards" not in proc.stderr  # no progress bar waits for it


@pytest.mark.slow(seconds=30)
@pytest.mark.timeout(420)
def test_a_stale_cluster_record_does_not_stop_a_local_ray_run(world, tmp_path):
    """`ray start --head` records its address in Ray's temporary folder; once that cluster died (not
    `ray stop`ped), Ray without an address connects to the record, which failed every run."""
    data = tmp_path / "c.parquet"
    pl.read_parquet(world / "corpus.parquet").head(4).write_parquet(data)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # a dead cluster's record
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run([sys.executable, "-m", "pipelines.score",
                               *score_args(world, data, tmp_path / "s", executor="ray")],
                              cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env={**env, "PEAR_QUIET": "1", "RAY_TMPDIR": str(ray_tmp)})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list_shards(tmp_path / "s")) == 1


@pytest.mark.slow(seconds=20)
@pytest.mark.timeout(400)
def test_a_cluster_that_refuses_the_token_is_one_line_and_exit_2(world, tmp_path):
    data = tmp_path / "c.parquet"
    pl.read_parquet(world / "corpus.parquet").head(2).write_parquet(data)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**env, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": "a" * 32})
    try:
        for _ in range(240):  # the head's GCS listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-m", "pipelines.score",
                               *score_args(world, data, tmp_path / "s", executor="ray")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**env, "PEAR_QUIET": "1", "RAY_ADDRESS": f"127.0.0.1:{port}",
                                   "RAY_AUTH_TOKEN": "b" * 32,
                                   # Ray asks the cluster 20 times, a second apart, before it gives up
                                   "RAY_NUM_REDIS_GET_RETRIES": "2"})
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and the daemons it started (its own process group)
        try:
            head.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"RAY_ADDRESS=127.0.0.1:{port}" in err[0]
    assert "refused this machine's authentication token" in err[0]


# ---- item 10: reweight keeps what is not given ----------------------------------------------------

def test_reweight_keeps_the_constants_not_given(scored, tmp_path):
    out = copy_scores(scored, tmp_path)
    assert reweight_main(["--scores", str(out), "--variant", "block", "--block-size", "2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "scorer.reweight", "--scores", str(out), "--gamma", "0.99"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # as `make reweight` runs it
    assert proc.returncode == 0, proc.stderr
    assert "variant, block_size, delta_clip, log_weight_clip kept from the shards" in proc.stdout
    assert reweight_main(["--scores", str(out), "--delta-clip", "-0.05,0.2"]) == 0  # a negative value, no "="
    expected = WeightParams("block", 0.99, 2, (-0.05, 0.2)).as_dict()
    for shard in list_shards(out):
        assert {k: read_meta(shard)[k] for k in expected} == expected
    assert json.loads((out / "summary.json").read_text())["params"] == expected


# ---- item 11: the refusal names the setting, inspect after reweight, the plot, negative values ----

def test_a_rerun_after_reweight_is_refused_naming_the_setting(scored, world, tmp_path, capsys):
    out = copy_scores(scored, tmp_path)
    assert reweight_main(["--scores", str(out), "--variant", "block"]) == 0
    assert score_main(score_args(world, scored / "corpus.parquet", out)) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "variant block in the shard, token here" in err and "reweight" in err
    assert score_main(score_args(world, scored / "corpus.parquet", out, "--variant", "block")) == 0


def test_inspect_after_reweight_says_the_timing_is_the_scoring_runs(scored, tmp_path, capsys):
    out = copy_scores(scored, tmp_path)
    assert reweight_main(["--scores", str(out), "--variant", "sequence"]) == 0
    capsys.readouterr()
    assert inspect_cli.main(["--scores", str(out)]) == 0
    printed = capsys.readouterr().out
    speed = json.loads((scored / "s" / "summary.json").read_text())["speed"]
    assert (f"the runs that scored them: tokens/s {speed['wall_tokens_per_second']:.0f} wall-clock "
            f"({speed['wall_seconds']}s over 1 run)") in printed and "shards 2, response tokens" in printed
    assert "reweighted since: variant sequence gamma 0.999" in printed


def test_a_rerun_that_scores_nothing_keeps_the_record_of_the_run_that_did(scored, world, tmp_path, capsys):
    # a rerun wrote its own empty run over summary.json (seconds 0.0, tokens/s null), and `make inspect`
    # then printed "- tokens/s": the record of the run that scored the shards was lost
    out = copy_scores(scored, tmp_path)
    before = json.loads((out / "summary.json").read_text())
    assert score_main(score_args(world, scored / "corpus.parquet", out)) == 0
    after = json.loads((out / "summary.json").read_text())
    assert after == before and after["speed"]["shards_timed"] == after["shards"] == 2
    assert after["speed"]["wall_tokens_per_second"] > 0 and after["speed"]["scoring_tokens_per_second"] > 0
    first, rerun = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert (first["shards_scored"], first["shards_kept"], rerun["shards_scored"], rerun["shards_kept"]) == (2, 0, 0, 2)
    assert rerun["wall_tokens_per_second"] is None and first["wall_tokens_per_second"] > 0
    assert "this run: 0 shards scored, 2 kept" in capsys.readouterr().out
    assert inspect_cli.main(["--scores", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tokens/s {after['speed']['wall_tokens_per_second']:.0f} wall-clock" in printed
    assert "tokens/s -" not in printed


def test_the_bar_and_the_summary_name_each_speed_by_its_clock(world, tmp_path, capsys):
    # the bar's `tok_s` (wall-clock time since the start) and the summary's tokens/s (scoring time per
    # shard) shared a name and meant different things
    pl.read_parquet(world / "corpus.parquet").head(8).write_parquet(tmp_path / "corpus.parquet")
    done = run(ScoreConfig(data=str(tmp_path / "corpus.parquet"), out=str(tmp_path / "s"), target=str(world / "target"),
                           behavior="none", executor="local", backend="torch", rows_per_shard=4), progress=True)
    bar = capsys.readouterr().err
    assert "wall_tok_s=" in bar and " tok_s=" not in bar and ",tok_s=" not in bar
    this_run, speed = done["this_run"], done["speed"]
    assert this_run["wall_tokens_per_second"] < this_run["scoring_tokens_per_second"]  # engine start is wall time
    # the summary's speeds are this one run's (rounded seconds apart)
    assert speed["wall_tokens_per_second"] == pytest.approx(this_run["wall_tokens_per_second"], rel=1e-2)
    assert speed["scoring_tokens_per_second"] == pytest.approx(this_run["scoring_tokens_per_second"], rel=1e-2)
    printed = format_summary(done)
    assert (f"tokens/s {speed['wall_tokens_per_second']:.0f} wall-clock" in printed
            and f"{speed['scoring_tokens_per_second']:.0f} of scoring time" in printed)


def test_inspect_to_a_file_that_is_no_image_is_one_line_and_exit_2(scored, tmp_path, capsys):
    # matplotlib refused out.txt at the end, with a 25-line traceback and exit code 1
    assert inspect_cli.main(["--scores", str(scored / "s"), "--png", str(tmp_path / "out.txt")]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert err.startswith(f"error: --png {tmp_path / 'out.txt'}: an image file ends in .png") and "not .txt" in err
    assert not (tmp_path / "out.txt").exists()


def test_the_histogram_spans_the_data_not_the_clip_range():
    params = WeightParams("token", log_weight_clip=(-10.0, 5.0))
    st = WeightStats(params)
    lw = [np.array([-0.4, -0.1, 0.0, 0.1, 0.2])]  # far inside the clip range
    st.add([np.exp(x) for x in lw], lw, [np.zeros(5)], [np.zeros(5)])
    ax = inspect_cli.plot_log_weights({"token": st}, "token", "t").axes[0]
    lo, hi = ax.get_xlim()
    assert -0.5 < lo < -0.4 and 0.2 < hi < 0.3
    assert not [x for x in ax.lines if x.get_xdata()[0] in (-10.0, 5.0)]  # the bounds are out of view
    # data that reaches a clip bound shows it
    st = WeightStats(WeightParams("token", log_weight_clip=(-0.4, 5.0)))
    st.add([np.exp(x) for x in lw], lw, [np.zeros(5)], [np.zeros(5)])
    ax = inspect_cli.plot_log_weights({"token": st}, "token", "t").axes[0]
    assert [x.get_xdata()[0] for x in ax.lines] == [-0.4]


def test_negative_comma_values_need_no_equals_sign():
    for argv in (["--delta-clip", "-0.08,0.3"], ["--delta-clip=-0.08,0.3"]):
        assert parse(ScoreConfig, argv + ["--log-weight-clip", "-5,1e-1"]).weights.params().as_dict() == \
            WeightParams(delta_clip=(-0.08, 0.3), log_weight_clip=(-5.0, 0.1)).as_dict()
    with pytest.raises(SystemExit):
        parse(ScoreConfig, ["--delta-clip", "-0.3,-0.08x"])  # not numbers: still refused
