"""Export of the weights to whole-sequence Parquet, and TRL's SFTTrainer applying them."""
from contextlib import nullcontext
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scorer import export as export_mod
from scorer.export import ExportConfig, export
from scorer.shards import list_shards, read_meta, spans_of, write_atomic
from train.data import collate, load_rows
from train.sft import ResponseLogprobs, micro_batch_loss


def exported(scores, out, convention="pear", **kw) -> pl.DataFrame:
    export(ExportConfig(scores=str(scores), out=str(out), convention=convention, progress=False, **kw))
    return pl.read_parquet(Path(out) / "*.parquet")


def shard_rows(scores) -> dict:
    """id -> (input_ids, spans, weights) as the scorer stored them."""
    out = {}
    for p in list_shards(scores):
        t = pq.read_table(p)
        for i, x, sp, w in zip(t.column("id").to_pylist(), t.column("input_ids").to_pylist(), spans_of(t),
                               t.column("weights").to_pylist()):
            out[i] = (x, sp, w)
    return out


# ---- export ------------------------------------------------------------------------------------

def test_export_aligns_weights_to_the_sequence(scores, tmp_path):
    df = exported(scores, tmp_path / "pear")
    stored = shard_rows(scores)
    assert df.height == len(stored) == 96
    corpus_columns = set(pq.read_schema(list_shards(scores)[0]).names) - {
        "prompt_len", "response_spans", "target_logprobs", "behavior_logprobs", "weights"}
    assert set(df.columns) == corpus_columns | {"loss_mask", "token_weights"}
    for row in df.iter_rows(named=True):
        ids, spans, w = stored[row["id"]]
        assert row["input_ids"] == ids
        trained = np.concatenate([np.arange(a, b) for a, b in spans])
        mask, weights = np.array(row["loss_mask"]), np.array(row["token_weights"], np.float32)
        assert len(mask) == len(weights) == len(ids)
        assert np.flatnonzero(mask).tolist() == trained.tolist()
        assert weights[trained].tolist() == np.asarray(w, np.float32).tolist()  # exactly the stored floats
        assert not weights[mask == 0].any()
    # pass-through columns are the corpus's own values
    corpus = pl.read_parquet(Path(read_meta(list_shards(scores)[0])["source"]))
    joined = df.join(corpus, on="id", how="inner", suffix="_corpus")
    assert joined.height == 96 and (joined["answer"] == joined["answer_corpus"]).all()
    assert (joined["response"] == joined["response_corpus"]).all()
    # the `pear` metadata is kept, with what the export did
    meta = read_meta(sorted((tmp_path / "pear").glob("*.parquet"))[0])
    assert meta["target_model"] == read_meta(list_shards(scores)[0])["target_model"]
    assert meta["export"]["convention"] == "pear" and meta["export"]["shifted"] is False
    # and `datasets` reads the folder as it is
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "pear" / "*.parquet"), split="train")
    assert ds.num_rows == 96 and ds.features["token_weights"].feature.dtype == "float32"


def test_trl_and_openrlhf_conventions(scores, tmp_path):
    pear = exported(scores, tmp_path / "pear").sort("id")
    trl = exported(scores, tmp_path / "trl", "trl").sort("id")
    orl = exported(scores, tmp_path / "openrlhf", "openrlhf").sort("id")
    for a, b, c in zip(pear.iter_rows(named=True), trl.iter_rows(named=True), orl.iter_rows(named=True)):
        ids, mask = np.array(a["input_ids"]), np.array(a["loss_mask"])
        assert np.array(b["labels"]).tolist() == np.where(mask == 1, ids, -100).tolist()
        assert b["token_weights"] == a["token_weights"]
        # openrlhf: position t carries the prediction of token t + 1
        assert c["loss_mask"] == a["loss_mask"][1:] + [0]
        assert c["token_weights"] == a["token_weights"][1:] + [0.0]
    assert "labels" not in pear.columns and "labels" in exported(scores, tmp_path / "l", labels=True).columns


def test_export_refuses_what_it_would_overwrite_and_drops_its_stale_files(scores, tmp_path):
    out = tmp_path / "out"
    one = tmp_path / "one"
    one.mkdir()
    first = list_shards(scores)[0]
    (one / first.name).write_bytes(first.read_bytes())
    exported(scores, out)
    assert len(list(out.glob("*.parquet"))) == 2
    assert exported(one, out).height == 48  # the other shard's earlier export is gone
    assert [p.name for p in out.glob("*.parquet")] == [first.name]

    pq.write_table(pa.table({"x": [1]}), out / "mine.parquet")  # someone else's file: never touched
    rc = export_mod.main(["--scores", str(scores), "--out", str(out), "--progress", "false"])
    assert rc == 2 and (out / "mine.parquet").exists()
    assert export_mod.main(["--scores", str(scores), "--out", str(scores)]) == 2
    assert export_mod.main(["--scores", str(scores), "--out", str(tmp_path / "x"), "--convention", "axolotl"]) == 2


def test_export_names_the_row_of_a_broken_shard(scores, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    path = list_shards(scores)[1]
    table, meta = pq.read_table(path), read_meta(path)
    weights = table.column("weights").to_pylist()
    weights[5] = weights[5][:-1]
    table = table.set_column(table.schema.get_field_index("weights"), "weights",
                             pa.array(weights, pa.list_(pa.float32())))
    write_atomic(table, broken / path.name, meta)
    rc = export_mod.main(["--scores", str(broken), "--out", str(tmp_path / "o"), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 5" in err and "weights" in err and path.name in err
    assert not list((tmp_path / "o").glob("*.parquet"))  # no half-written file

    # a pass-through column named like an exported one is refused, not overwritten
    clash = tmp_path / "clash"
    clash.mkdir()
    table = pq.read_table(path)
    write_atomic(table.append_column("loss_mask", pa.array([[1]] * table.num_rows)), clash / path.name, meta)
    rc = export_mod.main(["--scores", str(clash), "--out", str(tmp_path / "o2"), "--progress", "false"])
    assert rc == 2 and "['loss_mask']" in capsys.readouterr().err


# ---- TRL ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_data(scores, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_export")
    export(ExportConfig(scores=str(scores), out=str(out), convention="trl", progress=False))
    return datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")


def trl_trainer(world, data, tmp_path, cls=None, **kw):
    """A TRL trainer (ours unless `cls`) on the world's target model, the model the shards were scored with."""
    from trl import SFTConfig

    from train.trl_trainer import PearSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, save_strategy="no",
                     per_device_train_batch_size=8, logging_steps=1, seed=0, **kw)
    return (cls or PearSFTTrainer)(model=model, args=args, train_dataset=data,
                                   processing_class=AutoTokenizer.from_pretrained(world / "target"))


def test_trl_loss_is_ours_on_one_batch(world, scores, trl_data, tmp_path):
    trainer = trl_trainer(world, trl_data, tmp_path)
    rows, _ = load_rows(scores, 10_000)
    picked = [0, 3, 17, 48, 50, 77, 90, 95]  # from both shards
    examples = [trl_data[i] for i in picked]
    batch = trainer.data_collator(examples)
    model = trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(model, batch)
        ours = collate(rows, [rows.ids.index(e["id"]) for e in examples])
        ours_loss, _ = micro_batch_loss(ResponseLogprobs(model, 2048), ours, "pear", None, ours.num_tokens,
                                        nullcontext())
    assert ours.weights.std() > 0.01  # the weights are not all alike, so the test can tell
    assert abs(float(theirs) - float(ours_loss)) < 1e-5
    # the normalisation is TRL's: num_items_in_batch (trained tokens of the whole step) divides the sum
    with torch.no_grad():
        assert_close_f(trainer.compute_loss(model, batch, num_items_in_batch=2 * ours.num_tokens), ours_loss / 2)


def assert_close_f(a, b, tol=1e-5):
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


def test_all_ones_weights_give_trls_own_loss(world, trl_data, tmp_path):
    from trl import SFTTrainer

    ours = trl_trainer(world, trl_data, tmp_path)
    plain = trl_trainer(world, trl_data.remove_columns(["token_weights"]), tmp_path, cls=SFTTrainer)
    examples = [{**trl_data[i], "token_weights": [float(m) for m in trl_data[i]["loss_mask"]]} for i in range(8)]
    batch = ours.data_collator(examples)
    with torch.no_grad():
        a = ours.compute_loss(ours.model.eval(), batch)
        b = plain.compute_loss(ours.model, {k: v for k, v in batch.items() if k != "token_weights"})
    assert_close_f(a, b, 1e-6)


def test_a_real_trl_run_trains_with_the_weights(world, trl_data, tmp_path):
    # weights of a known value, whatever the world draw: every trained token 0.25, then every one 1.
    # The first step (same start, same rows) must log a quarter of the all-ones loss and mean weight
    # 0.25: the weights reached TRL's loss, scaling the same per-token NLL.
    logs = {}
    for name, w in (("quarter", 0.25), ("ones", 1.0)):
        data = trl_data.map(lambda r, w=w: {"token_weights": [w * m for m in r["loss_mask"]]})
        trainer = trl_trainer(world, data, tmp_path / name, max_steps=2, learning_rate=1e-3)
        before = {k: v.clone() for k, v in trainer.model.named_parameters()}
        trainer.train()
        logs[name] = [x for x in trainer.state.log_history if "loss" in x]
        assert len(logs[name]) == 2 and all(np.isfinite(x["loss"]) for x in logs[name])
        assert all(x["mean_weight"] == pytest.approx(w) for x in logs[name])
        assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    # transformers logs the loss rounded to 4 decimals
    assert logs["quarter"][0]["loss"] == pytest.approx(0.25 * logs["ones"][0]["loss"], abs=2e-4)


@pytest.mark.slow(seconds=12)
def test_the_readme_trl_example_runs_on_a_cpu(world, scores, tmp_path):
    """The README's TRL recipe as it is written, on this export and the world's target, with no GPU
    (TRL's bf16 default once made it fail on a CPU)."""
    import os
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    trl = readme[readme.index("- **TRL**"):]
    start = trl.index("```python") + len("```python")
    code = textwrap.dedent(trl[start: trl.index("```", start)])
    export(ExportConfig(scores=str(scores), out=str(tmp_path / "export"), convention="trl", progress=False))
    for theirs, ours in [("runs/export/*.parquet", str(tmp_path / "export" / "*.parquet")),
                         ("your/target", str(world / "target")), ("runs/trl", str(tmp_path / "trl"))]:
        assert theirs in code
        code = code.replace(theirs, ours)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train_loss" in done.stdout + done.stderr


def test_collator_keeps_weights_aligned_padding_free_and_truncated(world, trl_data, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.trl_trainer import WeightedCollator

    examples = [trl_data[i] for i in range(4)]
    free = WeightedCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))(examples)
    w, labels = free["token_weights"][0], free["labels"][0]
    assert w.shape == labels.shape
    assert torch.equal(w, torch.cat([torch.tensor(e["token_weights"]) for e in examples]))
    assert not w[labels == -100].any()  # never a weight where TRL takes no loss

    cut = [{**e, "input_ids": e["input_ids"][-20:], "labels": e["labels"][-20:]} for e in examples]
    batch = WeightedCollator(DataCollatorForLanguageModeling(pad_token_id=0), max_length=20, keep_end=True)(cut)
    assert torch.equal(batch["token_weights"][0], torch.tensor(examples[0]["token_weights"][-20:]))
    with pytest.raises(ValueError, match="token_weights"):
        WeightedCollator(DataCollatorForLanguageModeling(pad_token_id=0))(cut)  # not truncated by TRL: refused
    with pytest.raises(ValueError, match="packing"):
        trl_trainer(world, trl_data, tmp_path, packing=True, max_length=64)


# ---- verl and OpenRLHF: their loss formulas on exported rows (the frameworks are not installed here) ----

def exported_rows(scores, out, convention, n=8) -> list[dict]:
    rows = exported(scores, out, convention).sort("id")
    return list(rows.gather(np.linspace(0, rows.height - 1, n).astype(int)).iter_rows(named=True))


def next_token_logprobs(model, seqs: list[list[int]]) -> torch.Tensor:
    """(B, L-1): log p(x[t+1] | x[:t+1]) of right-padded rows (0 past each row's end)."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return lp * attn[:, 1:]


def our_loss(model, scores, ids: list[str]) -> tuple[float, int]:
    """train.sft's loss on these rows as one global batch, and its number of trained tokens."""
    rows, _ = load_rows(scores, 10_000)
    batch = collate(rows, [rows.ids.index(i) for i in ids])
    with torch.no_grad():
        loss, _ = micro_batch_loss(ResponseLogprobs(model, 2048), batch, "pear", None, batch.num_tokens,
                                   nullcontext())
    return float(loss), batch.num_tokens


def test_verl_sft_loss_on_exported_rows_is_ours(world, scores, tmp_path):
    """verl's SFT loss (verl/workers/utils/losses.py `sft_loss`, no-padding batches): the rows are
    concatenated, the log-prob at flat position t is that of token t + 1 (rolled input_ids), the
    token-aligned loss_mask is rolled by -1 the same way, and
        loss = -sum_t logp_t * mask_rolled_t / (sum of loss_mask over the global batch)
    (times dp_size, which FSDP's gradient average cancels). The README recipe multiplies the rolled
    token_weights into the numerator and leaves the denominator the mask's token count."""
    model = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).eval()
    rows = exported_rows(scores, tmp_path / "verl", "verl")
    lp = next_token_logprobs(model, [r["input_ids"] for r in rows])
    flat_lp = torch.cat([torch.cat([lp[i, : len(r["input_ids"]) - 1], torch.tensor([-1e4])])  # row end: masked
                         for i, r in enumerate(rows)])
    mask = torch.cat([torch.tensor(r["loss_mask"], dtype=torch.float32) for r in rows])
    w = torch.cat([torch.tensor(r["token_weights"]) for r in rows])
    assert all(r["loss_mask"][0] == 0 for r in rows)  # the roll carries a row's first mask into the row before
    theirs = -(flat_lp * torch.roll(w, -1)).sum() / mask.sum()
    ours, n = our_loss(model, scores, [r["id"] for r in rows])
    assert int(mask.sum()) == n
    assert abs(float(theirs) - ours) < 1e-5
    # the shortcut "weights as a float loss_mask" normalises by sum(w) instead: another loss
    shortcut = -(flat_lp * torch.roll(w, -1)).sum() / w.sum()
    assert abs(float(shortcut) - ours * n / float(w.sum())) < 1e-5 and abs(float(shortcut) - ours) > 1e-3


def test_openrlhf_sft_loss_on_exported_rows_is_ours(world, scores, tmp_path):
    """OpenRLHF's SFT loss (openrlhf/trainer/sft_trainer.py with models/loss.py `SFTLoss`): the
    dataset's loss_mask is prediction-aligned (position t masks the prediction of token t + 1),
    the trainer takes loss_mask[:, :-1] against the actor's log-probs of the rolled sequence, and
        loss = sum_t -logp_t * mask_t / (sum of the mask over the optimizer step, all ranks)
    The README recipe multiplies the shifted token_weights into the numerator."""
    model = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).eval()
    rows = exported_rows(scores, tmp_path / "openrlhf", "openrlhf")
    lp = next_token_logprobs(model, [r["input_ids"] for r in rows])  # (B, L-1)
    pad = lambda key: torch.stack([torch.nn.functional.pad(torch.tensor(r[key], dtype=torch.float32),  # noqa: E731
                                                           (0, lp.shape[1] + 1 - len(r[key]))) for r in rows])
    mask, w = pad("loss_mask")[:, :-1], pad("token_weights")[:, :-1]
    theirs = (w * -lp).sum() / mask.sum()
    ours, n = our_loss(model, scores, [r["id"] for r in rows])
    assert int(mask.sum()) == n
    assert abs(float(theirs) - ours) < 1e-5
