"""`make sft`: score the embedded corpus when needed, then weighted SFT once per weighting.

    python -m pipelines.sft [--scores runs/score] [--out runs/sft] [--weighting uniform,pear] [train.sft flags]

Default: plain SFT (uniform) then PEAR on the same tokens, the same batches and the same held-out
rows, each into `out/<weighting>/`, then a table of final loss and held-out NLL side by side.
With a single weighting the model folder is `out` itself. Any other flag goes to `train.sft`
(e.g. --epochs 2 --lr 1e-4 --variant block --model path). Exit code 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from common import console
from common.config import setup_logging
from common.storage import as_path
from pipelines.recipes import embedded_config
from pipelines.world import world_dir
from scorer.shards import ShardError, list_shards, read_meta
from scorer.weights import WeightParams
from train import sft

log = logging.getLogger("pear.pipelines")
WORLD = world_dir()  # built by pipelines.score when needed
DEFAULT_SCORES = "runs/score"


def ensure_scores(scores: str) -> None:
    """The default folder: run `pipelines.score` (builds the world and scores only what is missing;
    nothing when all is cached), keeping the weighting its shards already have (a `reweight` is
    not undone). Another folder must already hold shards."""
    if Path(scores) != Path(DEFAULT_SCORES):
        if not (as_path(scores).is_dir() and list_shards(scores)):  # a local folder or an object-storage URI
            raise FileNotFoundError(f"no shards in {scores}; run `make score OUT={scores}` first")
        return
    shards = list_shards(scores) if Path(scores).is_dir() else []
    weighting = []
    if shards:
        meta = read_meta(shards[0])
        if not uses_world(meta):
            return  # the user's own scores in the default folder: nothing of the world is needed
        weighting = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in meta.items() if k in WeightParams().as_dict()]
    log.info("making sure %s holds the scored embedded corpus", scores)
    # a child process: an in-process vLLM engine pins the CPU threads that training needs next
    streams = console.child_streams()
    if shards:  # a check of shards made before: their summary was shown then (runs/score/summary.json)
        streams["stdout"] = subprocess.DEVNULL
    subprocess.run([sys.executable, "-m", "pipelines.score", "--out", scores, "--executor", "local", *weighting],
                   **streams, check=True)


def uses_world(meta: dict) -> bool:
    """Were these shards scored against the embedded target?"""
    target = meta.get("target_model", {}).get("path", "")
    return bool(target) and Path(target).resolve().is_relative_to(WORLD.resolve())


def uses_world_model(scores: str, rest: list[str]) -> bool:
    """Is the model to train the embedded target (no --model, shards scored against it)?"""
    if any(a == "--model" or a.startswith("--model=") for a in rest):
        return False
    return uses_world(read_meta(list_shards(scores)[0]))


def format_table(summaries: list[dict]) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [f"{'weighting':10} {'steps':>5} {'final loss':>10} {'last epoch':>10} {'held-out NLL':>17} "
             f"{'mean w':>7} {'ESS':>6} {'train s':>7}"]
    for s in summaries:
        lines.append(f"{s['weighting']:10} {s['steps']:5d} {f(s['final_loss']):>10} {f(s['last_epoch_loss']):>10} "
                     f"{f(s['heldout_nll_start']) + ' -> ' + f(s['heldout_nll']):>17} {s['mean_weight']:7.3f} "
                     f"{s['mean_ess_fraction']:6.1%} {s['loop_seconds']:7.1f}")
    lines.append("(loss and held-out NLL: plain mean NLL per response token, comparable across weightings; "
                 "ESS: mean per-step share of tokens)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", default=DEFAULT_SCORES, help="scoring output folder")
    p.add_argument("--out", default="runs/sft", help="output folder (out/<weighting>/ for several weightings)")
    p.add_argument("--weighting", default="uniform,pear", help="comma-separated: uniform, pear, pear-live")
    args, rest = p.parse_known_args(argv)
    setup_logging()
    console.quiet(Path(args.out) / "sft.log")
    try:
        ensure_scores(args.scores)
    except (FileNotFoundError, ShardError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=console.err())
        return 2
    # the embedded target's recipe (recipes/embedded-sft.yaml) first, so that flags given here win
    recipe = embedded_config("sft", rest) if uses_world_model(args.scores, rest) else []
    arms = [w.strip() for w in args.weighting.split(",") if w.strip()]
    summaries = []
    for arm in arms:
        out = Path(args.out) if len(arms) == 1 else Path(args.out) / arm
        rc = sft.main(recipe + ["--scores", args.scores, "--out", str(out), "--weighting", arm] + rest)
        if rc:
            return rc
        summaries.append(json.loads((out / "train_summary.json").read_text()))
    print(format_table(summaries), file=console.out())
    print(f"models in {', '.join(s['out'] for s in summaries)}", file=console.out())
    return 0


if __name__ == "__main__":
    sys.exit(main())
