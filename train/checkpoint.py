"""Checkpoints and resume, for every trainer: one layout, one atomic save, one resume check.

    OUT/checkpoints/step-000120/   a Hugging Face model folder (weights, config, tokenizer)
                                   + trainer_state.pt: the step, the optimizer, the RNG, `made_from`
                                   and whatever else the trainer keeps to go on where it stopped

`made_from` is a dict of everything the run's result depends on (its settings, and fingerprints
of its data and starting weights). A rerun resumes from the last checkpoint only when its own
`made_from` is equal; otherwise it refuses, naming what changed, or starts over with --overwrite.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from common.config import ConfigError

STATE = "trainer_state.pt"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under `out` (temporary folders are never listed)."""
    folder = Path(out) / "checkpoints"
    ckpts = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return ckpts[-1] if ckpts else None


def save(out: Path, step: int, lm, tokenizer, state: dict, keep: int, model_state_dict: dict | None = None) -> Path:
    """An HF folder plus trainer_state.pt, written under a temporary name and renamed, so that a
    kill leaves the previous checkpoint whole; only the newest `keep` are kept. `state` holds the
    optimizer's state dict under "optimizer" like any other entry."""
    folder = Path(out) / "checkpoints" / f"step-{step:06d}"
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, state_dict=model_state_dict)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in sorted((Path(out) / "checkpoints").glob("step-*"))[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def snapshot(out: Path, step: int, lm, tokenizer) -> Path:
    """The model after `step`, weights and tokenizer only, in OUT/snapshots/step-NNNNNN (kept: these
    are for evaluating a run's progress, not for resuming), with snapshot.json naming the run it
    belongs to, so that an evaluation finds what the run trained on. Written under a temporary name first."""
    folder = Path(out) / "snapshots" / f"step-{step:06d}"
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "snapshot.json").write_text(json.dumps({"run": str(Path(out).resolve()), "step": step}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def resume(out: Path, made_from: dict, overwrite: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint, its state) to go on from, or (None, None) to start over.

    A checkpoint made from anything else is refused with the keys that differ (ConfigError), or,
    with `overwrite`, forgotten: the caller clears `checkpoints/` before writing a new one.
    """
    ckpt = latest(out)
    if ckpt is None:
        return None, None
    state = load_state(ckpt / STATE)
    before = state.get("made_from", {})
    if before == made_from:
        return ckpt, state
    if overwrite:
        return None, None
    changed = sorted(k for k in set(made_from) | set(before) if before.get(k) != made_from.get(k))
    raise ConfigError(f"{ckpt} was made with other settings or data ({', '.join(changed)}); "
                      "use a new --out or --overwrite true")


def load_state(path: Path) -> dict:
    """A checkpoint's trainer state, read as tensors and plain data only (`weights_only=True`): a
    pickle that names any other object, which would run code as it loads, is refused (ConfigError)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: refused, it holds objects other than tensors and plain data, which would run "
                          f"code as it loads ({reason[:160]}); resume only from checkpoints this project wrote, "
                          "or start over with a new --out or --overwrite true") from None


def clear(out: Path) -> None:
    """Forget every checkpoint and snapshot (a run that starts over)."""
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)
    shutil.rmtree(Path(out) / "snapshots", ignore_errors=True)


def keep_lines_upto(path: Path, step: int) -> None:
    """Drop the JSON lines of steps after `step`: a resumed run writes them again."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
