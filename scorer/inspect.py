"""Look at a scoring run: the printed summary and a PNG histogram of log-weights per variant.

    python -m scorer.inspect --scores runs/score     # writes runs/score/log_weights.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from scorer.shards import list_shards, read_meta
from scorer.weights import VARIANTS, WeightParams, ragged_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", default="runs/score")
    p.add_argument("--png", default=None, help="output image (default: SCORES/log_weights.png)")
    a = p.parse_args(argv)
    try:
        shards = list_shards(Path(a.scores))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not shards:
        print(f"error: no shards in {a.scores}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scorer.job import format_summary

    meta = read_meta(shards[0])
    target, behavior = [], []
    for s in shards:
        t = pq.read_table(s, columns=["target_logprobs", "behavior_logprobs"])
        target += [np.asarray(x, np.float32) for x in t.column("target_logprobs").to_pylist()]
        behavior += [np.asarray(x, np.float32) for x in t.column("behavior_logprobs").to_pylist()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, variant in zip(axes, [v for v in VARIANTS if v != "none"]):
        params = WeightParams(variant, meta["gamma"], meta["block_size"], tuple(meta["delta_clip"]),
                              tuple(meta["log_weight_clip"]))
        _, logs = ragged_weights(target, behavior, params)
        ax.hist(np.concatenate(logs), bins=60, color="tab:blue")
        for bound in params.log_weight_clip:
            ax.axvline(bound, color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{variant}" + (" (in shards)" if variant == meta["variant"] else ""))
        ax.set_xlabel("log G (clipped)")
    axes[0].set_ylabel("response tokens")
    fig.suptitle(f"PEAR log-weights, {a.scores}")
    fig.tight_layout()
    png = Path(a.png or Path(a.scores) / "log_weights.png")
    fig.savefig(png, dpi=110)
    summary = Path(a.scores) / "summary.json"
    if summary.exists():
        print(format_summary(json.loads(summary.read_text())))
    print(f"histogram: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
