"""`make demo`: the whole pipeline on the embedded default, from nothing.

    python -m pipelines.demo [--out runs] [--smoke]

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
from dataclasses import dataclass
from pathlib import Path

from common import console
from common.config import cli, field, setup_logging
from pipelines import score
from pipelines.stages import command as stages_command
from pipelines.stages import stage

ARMS = ("uniform", "pear")


def stages(plan: list[tuple[str, list[tuple[dict, Path]]]]) -> None:
    """Each (title, stages) of the plan, the stages (pipelines/stages.py items, the file each leaves
    when done) all in one child process (pipelines.stages: one start-up of Python, torch and vLLM, and engines
    and threads that start clean), skipping those done."""
    items: list = []
    for title, group in plan:
        todo = [item for item, done in group if not done.exists()]
        items += [f"== {title}", *todo] if todo else \
            [f"== {title}: cached ({', '.join(str(done.parent) for _, done in group)})"]
    if any(isinstance(item, dict) for item in items):
        subprocess.run(stages_command(items), check=True, **console.child_streams())
    else:
        for line in items:
            say(line)


def say(text: str = "") -> None:
    print(text, file=console.out(), flush=True)


# --smoke: every stage at its smallest, for a test of the command (the numbers mean nothing)
SMOKE = {"score": {"executor": "local", "backend": "torch"},
         "sft": {"max_steps": 3},
         "rl": {"steps": 2, "prompts_per_step": 4, "samples_per_prompt": 4},
         "eval": {"num_prompts": 24, "n": 8, "k": "1,8"}}


@dataclass
class DemoConfig:
    """The whole pipeline on the embedded default."""

    out: str = field("runs", "root of the stages' output folders")
    smoke: bool = field(False, "every stage at its smallest (checks the command only)")


def run(cfg: DemoConfig) -> int:
    """Every stage, then the table; the exit code (the scoring's, when it fails)."""
    root = Path(cfg.out)
    extra = SMOKE if cfg.smoke else {}
    t0 = time.time()
    say(f"== score: {root / 'score'} (embedded corpus, target and behavior models)")
    rc = score.STAGE.run({"out": str(root / "score"), **extra.get("score", {})})
    if rc:
        return rc
    sft, rl = ({arm: root / stage / arm for arm in ARMS} for stage in ("sft", "rl"))
    before, after = ({arm: root / "eval" / f"{when}-{arm}" for arm in ARMS} for when in ("sft", "rl"))

    def evaluate(model: Path, out: Path, **baseline) -> tuple[dict, Path]:
        return stage("pipelines.rl:EVAL", model=model, out=out, **baseline, **extra.get("eval", {})), out / "eval.json"

    stages([
        ("sft: uniform and PEAR", [(stage("pipelines.sft", scores=root / "score", out=root / "sft",
                                          **extra.get("sft", {})), root / "sft" / "pear" / "train_summary.json")]),
        ("eval before RL: uniform and PEAR", [evaluate(sft[arm], before[arm]) for arm in ARMS]),
        *((f"rl from {arm}", [(stage("pipelines.rl:RL", model=sft[arm], out=rl[arm], **extra.get("rl", {})),
                               rl[arm] / "rl_summary.json")]) for arm in ARMS),
        ("eval after RL: uniform and PEAR", [evaluate(rl[arm], after[arm], baseline=before[arm]) for arm in ARMS]),
    ])
    rows = [(arm, json.loads((after[arm] / "eval.json").read_text())) for arm in ARMS]

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
        f"{root}/eval/*/eval.md; `make experiment` compares more arms over seeds)")
    say(f"== demo done in {time.time() - t0:.0f}s")
    return 0


def main(argv=None) -> int:
    setup_logging()
    # the lines go out as each stage ends; the exit code is the run's
    return cli(DemoConfig, argv, __doc__, run, lambda rc: None, log="demo.log", status=lambda rc: rc)


if __name__ == "__main__":
    sys.exit(main())
