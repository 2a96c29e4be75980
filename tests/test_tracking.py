"""--report-to: the per-step metrics and the scorer's weight table reach TensorBoard and wandb (offline)."""
import json
import struct
from pathlib import Path

import pytest

from scorer.config import WeightConfig
from scorer.stats import TABLE_COLUMNS
from train import sft
from train.sft import SFTConfig, train


def sft_run(scores, out, report_to):
    train(SFTConfig(scores=str(scores), out=str(out), max_steps=3, token_budget=512, progress=False, threads=1,
                    save_every=0, report_to=report_to, weights=WeightConfig(variant="")))
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> tuple[dict, object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}, ea


def test_tensorboard_gets_the_steps_and_the_weight_table(scores, tmp_path):
    metrics = sft_run(scores, tmp_path / "tb", "tensorboard")
    scalars, ea = tensorboard_scalars(tmp_path / "tb" / "tensorboard")
    for key in ("loss", "weighted_loss", "mean_weight", "ess_fraction", "lr", "grad_norm"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3]
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    text = ea.Tensors("scorer/weights/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(c in text for c in TABLE_COLUMNS) and "| token | True |" in text


def wandb_history(folder: Path) -> list[dict]:
    """The history records of an offline wandb run, read from its .wandb file (a LevelDB-style log of
    protobuf records after a 7-byte header: 32 KiB blocks, each record chunk with crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):  # block trailer
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def test_wandb_offline_gets_the_steps_and_the_weight_table(scores, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = sft_run(scores, tmp_path / "wb", "wandb")
    history = wandb_history(tmp_path / "wb")
    steps = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3]
    assert [h["train/loss"] for h in steps] == pytest.approx([m["loss"] for m in metrics], rel=1e-9)
    table = next(h for h in history if h.get("scorer/weights/_type") == "table-file")
    assert table["scorer/weights/ncols"] == len(TABLE_COLUMNS) and table["scorer/weights/nrows"] == 4
    [stored] = (tmp_path / "wb").glob("wandb/offline-run-*/files/" + table["scorer/weights/path"])
    assert json.loads(stored.read_text())["columns"] == list(TABLE_COLUMNS)


def test_unknown_tracker_is_refused_before_any_work(scores, tmp_path, capsys):
    rc = sft.main(["--scores", str(scores), "--out", str(tmp_path / "o"), "--report-to", "mlflow"])
    assert rc == 2 and "--report-to 'mlflow'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
