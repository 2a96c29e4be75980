"""What a trainer records as it goes, the same for train.sft and train.rl.

    OUT/metrics.jsonl   one JSON line per step (a step's metrics dict); the tracker and the
                        progress bar get the same line as it is written
    OUT/*.jsonl         other per-step files (train.rl's reward_errors.jsonl) follow the same rules

A fresh run empties each per-step file; a resumed run keeps the lines of the steps its checkpoint
holds (`checkpoint.keep_lines_upto`) and writes the later ones again. The summary reads the
lines back at the end.
"""
from __future__ import annotations

import json
from pathlib import Path

from common import console
from common.storage import append_json_line
from train.checkpoint import keep_lines_upto
from train.tracking import Tracker


def start_lines(path: Path, resumed_step: int | None) -> Path:
    """`path`, a file of one JSON line per step, holding the lines of the steps a resumed checkpoint
    contains (`resumed_step`), or none afresh (None); its folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumed_step is not None:
        keep_lines_upto(path, resumed_step)
    else:
        path.write_text("")
    return path


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of a per-step file, in order."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def progress_bar(desc: str, total: int, start_step: int, show: bool):
    """The run's progress bar over its steps, on the terminal's stderr; `show` False: a bar that prints
    nothing (the other ranks, --progress false)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start_step, desc=desc, unit="step", disable=not show, file=console.err())


def record_step(metrics: dict, metrics_path: Path, tracker: Tracker, bar, postfix: dict[str, str]) -> None:
    """A step's metrics line: to metrics.jsonl, the tracker and the progress bar, which shows `postfix`
    (a few of the metrics, named and formatted for the bar)."""
    append_json_line(metrics, metrics_path)
    tracker.log(metrics, metrics["step"])
    bar.update(1)
    bar.set_postfix(**postfix)
