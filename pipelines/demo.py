"""`make demo`: the whole pipeline on the embedded default, from nothing.

    python -m pipelines.demo

score (runs/score) -> SFT, uniform and PEAR (runs/sft/{uniform,pear}) -> RL from each
(runs/rl/{uniform,pear}) -> evaluation before and after RL (runs/eval/...) -> one table.
Every stage is cached or resumes, so a second run only prints the table. A short RL budget keeps
the demo to a few minutes on 2 cores; `make experiment` is the controlled comparison.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from pipelines import score

ARMS = ("uniform", "pear")
RL_FLAGS = ["--steps", "15", "--prompts-per-step", "16", "--samples-per-prompt", "8", "--lr", "1e-4"]
EVAL_FLAGS = ["--num-prompts", "64", "--n", "8", "--k", "1,8"]


def step(title: str, args: list[str], done: Path) -> None:
    """One stage as a child process (engines and threads start clean), skipped when done."""
    if done.exists():
        print(f"== {title}: cached ({done.parent})")
        return
    print(f"== {title}", flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    print("== score: runs/score (embedded corpus, target and behavior models)", flush=True)
    rc = score.main(["--out", "runs/score"])
    if rc:
        return rc
    step("sft: uniform and PEAR", ["pipelines.sft", "--scores", "runs/score", "--out", "runs/sft"],
         Path("runs/sft/pear/train_summary.json"))
    rows = []
    for arm in ARMS:
        sft, rl = f"runs/sft/{arm}", f"runs/rl/{arm}"
        step(f"eval {arm} before RL", ["train.eval", "--model", sft, "--out", f"runs/eval/sft-{arm}", *EVAL_FLAGS],
             Path(f"runs/eval/sft-{arm}/eval.json"))
        step(f"rl from {arm}", ["train.rl", "--model", sft, "--out", rl, *RL_FLAGS], Path(rl) / "rl_summary.json")
        step(f"eval {arm} after RL", ["train.eval", "--model", rl, "--out", f"runs/eval/rl-{arm}", *EVAL_FLAGS],
             Path(f"runs/eval/rl-{arm}/eval.json"))
        before = json.loads(Path(f"runs/eval/sft-{arm}/eval.json").read_text())["groups"]["all"]
        after = json.loads(Path(f"runs/eval/rl-{arm}/eval.json").read_text())["groups"]["all"]
        rows.append((arm, before, after))

    print("\n| arm | pass@1 before RL | pass@8 before RL | pass@1 after RL | pass@8 after RL |")
    print("|---|---|---|---|---|")
    for arm, before, after in rows:
        cells = [f"{g[k]['mean']:.3f}" for g in (before, after) for k in ("pass@1", "pass@8")]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print(f"\n(held-out prompts, 8 samples each; RL {RL_FLAGS[1]} steps; bootstrap intervals in runs/eval/*/eval.md)")
    print(f"== demo done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
