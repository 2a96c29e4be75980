"""Experiment trackers beside metrics.jsonl: `--report-to none|tensorboard|wandb`.

metrics.jsonl stays the record; a tracker gets the same per-step numbers (under `train/`) and,
once, the scorer's weight diagnostics as a table (one row per variant: quantiles, mean, shares
at each clip, ESS). TensorBoard writes event files under OUT/tensorboard (a resumed run drops
the events after its checkpoint's step); wandb runs with the usual WANDB_* variables
(WANDB_PROJECT, default "pear"; WANDB_MODE=offline writes under OUT/wandb without an account).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from common.config import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    """No tracker: every call does nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def table(self, name: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        pass

    def close(self) -> None:
        pass


def numbers(metrics: dict) -> dict[str, float]:
    """The finite numeric entries (a tracker plots numbers; None and text stay in metrics.jsonl)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step"}


class TensorBoard(Tracker):
    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run replaces what a crashed one logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, metrics, step):
        for k, v in numbers(metrics).items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def table(self, name, columns, rows):
        cell = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), 0)

    def close(self):
        self.writer.close()


class Wandb(Tracker):
    def __init__(self, out: Path, name: str, config: dict):
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pear"), name=name, dir=str(out),
                              config=config, settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics, step):
        self.run.log({f"train/{k}": v for k, v in numbers(metrics).items()}, step=step)

    def table(self, name, columns, rows):
        self.run.log({name: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def close(self):
        self.run.finish()


def check_report_to(report_to: str) -> None:
    """ConfigError before any work when the tracker is unknown or its package is not installed."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"--report-to {report_to!r}: expected one of {', '.join(REPORT_TO)}")
    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if needs:
        import importlib.util

        if importlib.util.find_spec(needs) is None:
            raise ConfigError(f"--report-to {report_to} needs the `{needs}` package: pip install -e \".[track]\"")


def open_tracker(report_to: str, out: str | Path, name: str, config: dict, start_step: int = 0) -> Tracker:
    check_report_to(report_to)
    out = Path(out)
    if report_to == "tensorboard":
        return TensorBoard(out, start_step)
    if report_to == "wandb":
        return Wandb(out, name, config)
    return Tracker()
