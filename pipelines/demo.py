"""`make demo`: the whole pipeline on the embedded default, from nothing.

    python -m pipelines.demo

score (runs/score) -> SFT, uniform and PEAR (runs/sft/{uniform,pear}) -> RL from each
(runs/rl/{uniform,pear}) -> evaluation before and after RL on the same held-out prompts
(runs/eval/...) -> one table: did RL raise pass@1, with a paired 95% interval, for each arm.
The stages are the commands a user types (`pipelines.sft`, `pipelines.rl rl|eval`), so the demo
runs the embedded recipe of the experiment, one seed; `make experiment` is the controlled
comparison (more arms, seeds, and its power stated). Every stage is cached or resumes, so a second
run only prints the table.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipelines import score
from scorer import console
from scorer.config import setup_logging

ARMS = ("uniform", "pear")


def step(title: str, args: list[str], done: Path) -> None:
    """One stage as a child process (engines and threads start clean), skipped when done."""
    if done.exists():
        say(f"== {title}: cached ({done.parent})")
        return
    say(f"== {title}")
    subprocess.run([sys.executable, "-m", *args], check=True, **console.child_streams())


def say(text: str = "") -> None:
    print(text, file=console.out(), flush=True)


def main() -> int:
    setup_logging()
    console.quiet("runs/demo.log")
    t0 = time.time()
    say("== score: runs/score (embedded corpus, target and behavior models)")
    rc = score.main(["--out", "runs/score"])
    if rc:
        return rc
    step("sft: uniform and PEAR", ["pipelines.sft", "--scores", "runs/score", "--out", "runs/sft"],
         Path("runs/sft/pear/train_summary.json"))
    rows = []
    for arm in ARMS:
        sft, rl, before, after = f"runs/sft/{arm}", f"runs/rl/{arm}", f"runs/eval/sft-{arm}", f"runs/eval/rl-{arm}"
        step(f"eval {arm} before RL", ["pipelines.rl", "eval", "--model", sft, "--out", before],
             Path(before) / "eval.json")
        step(f"rl from {arm}", ["pipelines.rl", "rl", "--model", sft, "--out", rl], Path(rl) / "rl_summary.json")
        step(f"eval {arm} after RL", ["pipelines.rl", "eval", "--model", rl, "--out", after, "--baseline", before],
             Path(after) / "eval.json")
        rows.append((arm, json.loads((Path(after) / "eval.json").read_text())))

    say("\n| SFT | prompts | pass@1 before RL | pass@1 after RL | difference [95% paired] | RL raised pass@1 | "
          "pass@8 before | pass@8 after |")
    say("|---|---|---|---|---|---|---|---|")
    for arm, report in rows:
        vs = report["vs_baseline"]
        d, p8 = vs["pass@1"], vs["pass@8"]
        raised = "yes" if d["ci95"][0] > 0 else "no (lower)" if d["ci95"][1] < 0 else "not distinguishable"
        say(f"| {arm} | {vs['shared_prompts']} | {d['before']:.3f} | {d['after']:.3f} | {d['mean']:+.3f} "
              f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {raised} | {p8['before']:.3f} | {p8['after']:.3f} |")
    say(f"\n(the same held-out prompts before and after RL, {rows[0][1]['n']} samples each; details in "
          "runs/eval/*/eval.md; `make experiment` compares more arms over seeds)")
    say(f"== demo done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
