"""The SFT trainer end to end: a tiny run, weightings, resume, two ranks over gloo, bad input."""
import json
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.testing import assert_close

from common.config import ConfigError
from scorer.config import WeightConfig
from scorer.shards import ShardError, list_shards, read_meta, write_atomic
from train import checkpoint, sft
from train.data import collate, is_heldout, load_rows, plan_epoch, split_heldout, steps_of, stored_weight_params
from train.loss import token_weights
from train.sft import SFTConfig, train

from test_object_storage import free_port, s3  # noqa: F401 (the S3 server, a fixture)

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(scores, out, **kw) -> SFTConfig:
    base = dict(scores=str(scores), out=str(out), lr=2e-3, token_budget=512, heldout_fraction=0.1,
                warmup_ratio=0.1, progress=False, threads=1, save_every=0)
    weights = {k: kw.pop(k) for k in [f.name for f in fields(WeightConfig)] if k in kw}  # the weighting group
    return SFTConfig(**{**base, **kw}, weights=WeightConfig(**{"variant": "", **weights}))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def scores_start(scores) -> str:
    """The model the shards were scored with (where SFT starts)."""
    return read_meta(list_shards(scores)[0])["target_model"]["path"]


def params_of(folder):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())


# ---- a tiny run --------------------------------------------------------------------------------

@pytest.mark.world_draw
@pytest.mark.slow
def test_tiny_run_loss_falls_and_writes_an_hf_folder(world, twin_scores, tmp_path):
    scores = twin_scores
    out = tmp_path / "pear"
    s = train(cfg_for(scores, out, epochs=2))
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, s["steps"] + 1))
    assert set(m[0]) >= {"loss", "weighted_loss", "mean_weight", "ess", "ess_fraction", "lr", "tokens_per_s"}
    first_epoch = [x["loss"] for x in m if x["epoch"] <= 1]
    assert s["last_epoch_loss"] < 0.8 * np.mean(first_epoch)
    assert s["heldout_nll"] < s["heldout_nll_start"]
    assert all(0 < x["mean_weight"] < 1 and 0 < x["ess_fraction"] <= 1 for x in m)
    assert len(s["heldout_ids"]) == 8 and s["heldout_nll_start"] > 1.0  # as twin_scores was built
    assert all(x["weighted_loss"] < x["loss"] for x in m)

    # held-out rows are the hash split, recorded by id
    rows, _ = load_rows(scores, 10_000)
    assert s["heldout_ids"] == [i for i in rows.ids if is_heldout(i, 0.1)] and s["heldout_ids"]
    assert s["train_rows"] + s["heldout_rows"] == 96

    # a plain HF folder: every parameter moved, and the tokenizer is there
    from transformers import AutoTokenizer

    before, after = params_of(world / "target"), params_of(out)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(world / "target").get_vocab()
    assert (out / "checkpoints" / f"step-{s['steps']:06d}" / "trainer_state.pt").exists()
    assert json.loads((out / "train_summary.json").read_text())["final_loss"] == m[-1]["loss"]


@pytest.mark.slow
def test_vllm_loads_the_trained_checkpoint(scores, tmp_path):
    from scorer.engines import TorchScorer, VllmScorer

    out = tmp_path / "uniform"
    train(cfg_for(scores, out, weighting="uniform", max_steps=3))
    rows, _ = load_rows(scores, 10_000)
    first = rows.take(range(6))
    ids = [x.tolist() for x in first.input_ids]
    plens = [int(p) for p in first.prompt_lens]
    engine = VllmScorer(str(out), max_model_len=512, dtype="float32")
    try:
        by_vllm = engine.score(ids, plens)
    finally:
        engine.close()
    by_torch = TorchScorer(str(out)).score(ids, plens)
    # the trained weights, not the base model's: vLLM and torch agree on the new checkpoint
    assert max(np.abs(a - b).max() for a, b in zip(by_vllm, by_torch)) < 1e-3


@pytest.mark.slow
def test_uniform_and_variant_weightings(scores, tmp_path):
    uni = train(cfg_for(scores, tmp_path / "u", weighting="uniform", max_steps=4))
    m = metrics(tmp_path / "u")
    assert all(x["mean_weight"] == 1.0 and x["ess_fraction"] == 1.0 for x in m)
    assert all(x["loss"] == pytest.approx(x["weighted_loss"]) for x in m)
    assert uni["weight_params"] is None

    stored = train(cfg_for(scores, tmp_path / "p", max_steps=4))
    # --variant with the shards' own settings recomputes exactly the stored weights
    own = stored_weight_params(read_meta(list_shards(scores)[0]))
    again = train(cfg_for(scores, tmp_path / "v", max_steps=4, variant=own.variant, gamma=own.gamma,
                          block_size=own.block_size, delta_clip=own.delta_clip, log_weight_clip=own.log_weight_clip))
    for a, b in zip(metrics(tmp_path / "p"), metrics(tmp_path / "v")):
        assert a["mean_weight"] == pytest.approx(b["mean_weight"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert again["final_loss"] == pytest.approx(stored["final_loss"], rel=1e-4)
    # another variant gives other weights
    train(cfg_for(scores, tmp_path / "s", max_steps=4, variant="sequence"))
    assert metrics(tmp_path / "s")[0]["mean_weight"] != pytest.approx(metrics(tmp_path / "p")[0]["mean_weight"])

    # pear-live: step 1 sees the unchanged model, whose logprobs are the stored target logprobs; then
    # the weights follow the model. (A wide delta clip: with the default one, every delta of this
    # young model sits at the lower bound and the weights depend on the response length alone.)
    wide = dict(max_steps=4, variant="token", delta_clip=(-5.0, 5.0))
    train(cfg_for(scores, tmp_path / "w", **wide))
    train(cfg_for(scores, tmp_path / "l", weighting="pear-live", **wide))
    live, fixed = metrics(tmp_path / "l"), metrics(tmp_path / "w")
    assert live[0]["mean_weight"] == pytest.approx(fixed[0]["mean_weight"], rel=1e-3)
    assert live[-1]["mean_weight"] != pytest.approx(fixed[-1]["mean_weight"], rel=1e-2)


def test_constant_uniform_weight_scales_the_loss_not_the_adamw_step(scores, tmp_path):
    """Why the experiment's learning-rate control scales the learning rate: a constant weight on
    every token scales the loss by that factor, but AdamW divides the gradient scale out, so the
    parameters move about as far as with weight 1, not a quarter as far. Gradient clipping is off:
    it would clip the two runs' gradients differently (by how much depends on the world's draw),
    and only AdamW's epsilon is left to tell them apart."""
    train(cfg_for(scores, tmp_path / "one", weighting="uniform", max_steps=4, max_grad_norm=0.0))
    train(cfg_for(scores, tmp_path / "quarter", weighting="uniform", uniform_weight=0.25, max_steps=4,
                  max_grad_norm=0.0))
    one_m, quarter_m = metrics(tmp_path / "one"), metrics(tmp_path / "quarter")
    assert all(b["mean_weight"] == pytest.approx(0.25) and b["ess_fraction"] == pytest.approx(1.0) for b in quarter_m)
    assert quarter_m[0]["weighted_loss"] == pytest.approx(0.25 * one_m[0]["weighted_loss"], rel=1e-6)
    assert [b["loss"] for b in quarter_m] == pytest.approx([a["loss"] for a in one_m], rel=0.05)
    start = params_of(scores_start(scores))
    moved = lambda folder: torch.sqrt(sum(((p - start[n]) ** 2).sum() for n, p in params_of(folder).items()))  # noqa: E731
    ratio = float(moved(tmp_path / "quarter").detach() / moved(tmp_path / "one").detach())
    assert 0.7 < ratio < 1.3, ratio
    with pytest.raises(ConfigError, match="uniform-weight applies"):
        train(cfg_for(scores, tmp_path / "bad", uniform_weight=0.5))


def test_only_trains_on_the_rows_a_column_selects(scores, tmp_path):
    """--only style=careful (the experiment's oracle arm): the training rows are the careful traces
    among the rows not held out; the held-out rows are those of a run without it."""
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(p, columns=["id", "style"]) for p in list_shards(scores)])
    careful = [i for i, s in zip(table.column("id").to_pylist(), table.column("style").to_pylist())
               if s == "careful" and not is_heldout(i, 0.1)]
    assert 0 < len(careful) < table.num_rows
    s = train(cfg_for(scores, tmp_path / "careful", weighting="uniform", max_steps=1, only="style=careful"))
    full = train(cfg_for(scores, tmp_path / "all", weighting="uniform", max_steps=1))
    assert s["train_rows"] == len(careful) and s["heldout_ids"] == full["heldout_ids"]
    assert train(cfg_for(scores, tmp_path / "two", weighting="uniform", max_steps=1,
                         only="style=careful|words"))["train_rows"] > len(careful)
    for only, message in (("style", "COLUMN=VALUE"), ("colour=red", "no column 'colour'")):
        with pytest.raises((ConfigError, ShardError), match=message):
            train(cfg_for(scores, tmp_path / "bad", weighting="uniform", only=only))


def test_the_summary_records_absolute_paths(scores, tmp_path, monkeypatch):
    """Given relative paths, train_summary.json names the scores, model and output folder absolutely:
    evaluation follows them from any folder (it once read `"scores": "runs/mine"` from elsewhere)."""
    import os

    monkeypatch.chdir(tmp_path)
    s = train(cfg_for(os.path.relpath(scores, tmp_path), "out", weighting="uniform", max_steps=1,
                      model=os.path.relpath(scores_start(scores), tmp_path)))
    recorded = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert recorded["scores"] == str(Path(scores).resolve()) and recorded["out"] == str(tmp_path.resolve() / "out")
    assert recorded["model"] == str(Path(scores_start(scores)).resolve()) and s["scores"] == recorded["scores"]


def test_recomputed_weights_match_the_stored_ones_on_a_batch(scores):
    rows, meta = load_rows(scores, 10_000)
    batch = collate(rows, range(16))
    recomputed = token_weights("pear", batch, batch.target_logprobs, stored_weight_params(meta))
    assert_close(recomputed, batch.weights, rtol=1e-5, atol=1e-7)


# ---- resume ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_loss(scores, tmp_path, train_killed_after):
    cfg = cfg_for(scores, tmp_path / "whole", epochs=2, save_every=3)
    whole = train(cfg)
    assert whole["steps"] > 7

    # the second run dies right after its checkpoint at step 6
    cut = replace(cfg, out=str(tmp_path / "cut"))
    train_killed_after(lambda: train(cut), 6)
    state = checkpoint.load_state(tmp_path / "cut" / "checkpoints" / "step-000006" / "trainer_state.pt")
    assert state["step"] == 6  # where to go on in the data follows from the step
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints

    resumed = train(cut)
    assert resumed["resumed_from_step"] == 6
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    assert resumed["heldout_nll"] == pytest.approx(whole["heldout_nll"], rel=1e-6)
    assert [m["step"] for m in metrics(tmp_path / "cut")] == list(range(1, whole["steps"] + 1))
    a, b = params_of(tmp_path / "whole"), params_of(tmp_path / "cut")
    for k in a:
        assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

    # other settings on the same folder: refused, not silently mixed
    assert sft.main(["--scores", str(scores), "--out", str(tmp_path / "cut"), "--lr", "1e-4", "--threads", "1",
                     "--progress", "false"]) == 2


def test_a_rerun_that_trains_nothing_keeps_the_record_of_the_run_that_did(scores, tmp_path):
    # a rerun of `make sft` (its last checkpoint is the end) wrote its own wall time and resume step over
    # train_summary.json: the record of the run that trained the model was lost
    cfg = cfg_for(scores, tmp_path / "sft", max_steps=2)
    first = train(cfg)
    again = train(cfg)
    kept = ("seconds", "resumed_from_step", "loop_seconds", "tokens_per_second", "steps", "final_loss")
    assert {k: again[k] for k in kept} == {k: first[k] for k in kept} and first["resumed_from_step"] is None
    assert json.loads((tmp_path / "sft" / "train_summary.json").read_text())["seconds"] == first["seconds"]
    runs = [json.loads(x) for x in (tmp_path / "sft" / "history.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["to_step"]) for r in runs] == [(0, 2), (2, 2)]
    assert runs[0]["tokens"] > 0 and runs[1]["tokens"] == 0 and runs[0]["seconds"] <= first["seconds"]


# ---- two ranks -------------------------------------------------------------------------------

def two_rank_sft(scores, out, budget: int, per_step: int) -> list[str]:
    """`-m train.sft` and the flags of the one-process run the two-rank tests compare against
    (cfg_for with `weighting=pear, micro_batches=per_step, epochs=2, token_budget=budget`)."""
    return ["-m", "train.sft", "--scores", str(scores), "--out", str(out), "--lr", "2e-3", "--token-budget",
            str(budget), "--heldout-fraction", "0.1", "--warmup-ratio", "0.1", "--progress", "false", "--threads",
            "1", "--save-every", "0", "--weighting", "pear", "--micro-batches", str(per_step), "--epochs", "2"]


def assert_two_ranks_match_one(tmp_path, one: dict, also: tuple[str, ...] = ()) -> dict:
    """The two-rank run in tmp_path/two took the one-process run's steps (tmp_path/one, summary `one`):
    the same tokens, loss, gradient norm (and the metrics `also`) per step and the same weights.
    Returns the two-rank summary."""
    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"]
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["response_tokens"] == b["response_tokens"]
        for name in ("loss", *also):
            assert a[name] == pytest.approx(b[name], rel=1e-5), name
        # the summed (not averaged) gradient: Adam hides a gradient scale, the norm does not
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    p1, p2 = params_of(tmp_path / "one"), params_of(tmp_path / "two")
    for k in p1:
        assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5)
    return two


@pytest.mark.world_draw
@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_over_gloo_match_one_rank(scores, tmp_path, fsdp):
    # 5 micro-batches per step over 2 ranks: 3 on rank 0, 2 on rank 1 (uneven accumulation); 5k + 1
    # micro-batches per epoch, so each epoch's last step has one and rank 1 runs an idle one
    per_step = 5
    rows, _ = load_rows(scores, 10_000)
    train_rows, _ = split_heldout(rows, 0.1)
    # a token budget that gives this draw's rows such an epoch: how many micro-batches a budget makes
    # depends on the draw's lengths, so budgets are tried from the whole epoch in one micro-batch
    # down to the longest row (the count climbs through nearly every integer on the way), and the
    # largest that fits is taken: the fewest steps, so the least float drift between the two runs
    longest, total = int(train_rows.lengths.max()), int(train_rows.lengths.sum())
    found = next(((b, n) for b in range(total, longest - 1, -4)
                  if (n := len(plan_epoch(train_rows.lengths, b, 0, 0))) % per_step == 1 and n > per_step), None)
    assert found, f"no token budget gives {len(train_rows.lengths)} rows an epoch of 5k + 1 micro-batches"
    budget, n_micro = found
    common = dict(weighting="pear", micro_batches=per_step, epochs=2, token_budget=budget, fsdp=fsdp)
    one = train(cfg_for(scores, tmp_path / "one", **common))
    assert one["steps"] == 2 * len(steps_of(n_micro, per_step))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *two_rank_sft(scores, tmp_path / "two", budget, per_step), "--fsdp", str(fsdp)]
    # PYTHONFAULTHANDLER: a rank that aborts (a C++ std::terminate) prints every thread's Python stack,
    # so a failure says where each rank was
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = assert_two_ranks_match_one(tmp_path, one, also=("weighted_loss", "ess"))
    assert two["heldout_nll"] == pytest.approx(one["heldout_nll"], rel=1e-5)


# ---- bad input ---------------------------------------------------------------------------------

def broken_copy(scores, tmp_path, edit):
    """A copy of the shards where `edit(table, meta) -> (table, meta)` changed the second shard."""
    out = tmp_path / "broken"
    out.mkdir()
    paths = list_shards(scores)
    for p in paths:
        table, meta = pq.read_table(p), read_meta(p)
        if p == paths[1]:
            table, meta = edit(table, meta)
        write_atomic(table, out / p.name, meta)
    return out, out / paths[1].name


def set_row(table, column, row, value):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    values[row] = value
    i = table.column_names.index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type))


def _bad_edits():
    def version(t, m):
        return t, {**m, "schema_version": 99}

    def missing(t, m):
        return t.drop_columns(["weights"]), m

    def short_weights(t, m):
        return set_row(t, "weights", 3, t.column("weights")[3].as_py()[:-1]), m

    def out_of_vocab(t, m):
        ids = t.column("input_ids")[5].as_py()
        return set_row(t, "input_ids", 5, ids[:-1] + [50_000]), m

    return {"schema_version": (version, "schema_version 99", None), "missing": (missing, "missing columns", None),
            "short_weights": (short_weights, "weights has", 3), "vocab": (out_of_vocab, "vocabulary", 5)}


@pytest.mark.parametrize("case", sorted(_bad_edits()))
def test_bad_shards_exit_2_naming_file_and_row(scores, tmp_path, capsys, case):
    edit, words, row = _bad_edits()[case]
    folder, bad_file = broken_copy(scores, tmp_path, edit)
    rc = sft.main(["--scores", str(folder), "--out", str(tmp_path / "o"), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(bad_file) in err and words in err
    if row is not None:
        assert f"row {row} " in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_bad_settings_exit_2(scores, tmp_path, capsys):
    assert sft.main(["--scores", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert sft.main(["--scores", str(scores), "--out", str(tmp_path / "o"), "--weighting", "magic"]) == 2
    assert "weighting" in capsys.readouterr().err
    assert sft.main(["--scores", str(scores), "--out", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_exit_code_is_2(scores, tmp_path):
    def drop(t, m):
        return t.drop_columns(["prompt_len"]), m

    folder, bad_file = broken_copy(scores, tmp_path, drop)
    proc = subprocess.run([sys.executable, "-m", "train.sft", "--scores", str(folder), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert f"error: {bad_file}: missing columns ['prompt_len']" in proc.stderr


def test_activation_checkpointing_changes_memory_not_the_training(scores, tmp_path):
    plain = train(cfg_for(scores, tmp_path / "plain", max_steps=3))
    ckpt = train(cfg_for(scores, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True))
    assert [m["loss"] for m in metrics(tmp_path / "ckpt")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "plain")], rel=1e-5)
    a, b = params_of(tmp_path / "plain"), params_of(tmp_path / "ckpt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert plain["steps"] == ckpt["steps"] == 3


def test_build_model_starts_from_the_model_or_from_a_checkpoint(world, tmp_path):
    """Fresh: the model folder's weights, every parameter trained at the configured lr. From a checkpoint:
    its weights, its optimizer state and its RNG."""
    cfg = SFTConfig(lr=3e-4, progress=False)
    net, model, optimizer = sft.build_model(cfg, str(world / "target"), None, None, torch.device("cpu"), 1)
    assert model is net and net.lm.config.use_cache is False
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert len(optimizer.param_groups[0]["params"]) == len(list(net.parameters()))
    sum(p.float().square().sum() for p in net.parameters()).backward()  # one step: AdamW gets a state
    optimizer.step()
    net.lm.save_pretrained(tmp_path / "ckpt")
    rng = torch.manual_seed(7).get_state()
    state = {"optimizer": optimizer.state_dict(), "torch_rng": rng}
    torch.manual_seed(8)
    again, _, optimizer2 = sft.build_model(cfg, str(world / "target"), tmp_path / "ckpt", state, torch.device("cpu"), 1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_close(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


# ---- SFT on two nodes ------------------------------------------------------------------------

@pytest.mark.slow(seconds=25)
@pytest.mark.timeout(400)
def test_two_torchrun_nodes_on_shards_in_a_bucket_match_one_process(scores, s3, tmp_path):
    import pyarrow.fs as pafs

    bucket = s3()
    uri = f"{bucket}/scores"
    pafs.copy_files(str(scores), uri)
    budget, per_step = 384, 5
    common = dict(weighting="pear", micro_batches=per_step, epochs=2, token_budget=budget)
    one = train(cfg_for(uri, tmp_path / "one", **common))

    # two nodes of one process each: torchrun's static rendezvous, node ranks 0 and 1, over gloo
    port = free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(port)]
    args = two_rank_sft(uri, tmp_path / "two", budget, per_step)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    nodes = [subprocess.Popen(base + ["--node-rank", str(r)] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert_two_ranks_match_one(tmp_path, one)
