"""Look at a scoring run: the printed summary and a PNG histogram of log-weights per variant.

    python -m scorer.report --scores runs/score     # writes runs/score/log_weights.png

Shards are read a batch of rows at a time into fixed-bin histograms, so memory does not grow
with the corpus. One panel per variant of `scorer.weights.VARIANTS` but "none" (uniform), its
x-axis the range of the data; a log-weight clip bound within it is a dashed red line.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from common.config import ConfigError, cli, field
from common.storage import as_path
from scorer.shards import ShardError, list_shards, read_meta
from scorer.stats import VariantStats, WeightStats
from scorer.weights import VARIANTS, WeightParams


@dataclass
class InspectConfig:
    """The weight summary and log-weight histogram of a scoring run."""

    scores: str = field("runs/score", "scoring output folder")
    png: str = field("", "output image; empty: SCORES/log_weights.png")


def shard_params(path: Path) -> tuple[WeightParams, dict]:
    """The weight constants a shard was written with, and its whole `pear` metadata."""
    try:
        meta = read_meta(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    try:
        params = WeightParams.from_dict(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: bad weight constants in its metadata ({e!r})") from None
    return params, meta


def plot_log_weights(stats: dict[str, WeightStats], in_shards: str, title: str):
    """One histogram panel per entry of `stats` (at most 3 a row); returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stats)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13 / 3 * ncols, 3.6 * nrows), sharey=True, squeeze=False)
    for ax, (variant, st) in zip(axes.flat, stats.items()):
        if st.tokens:
            counts, edges = st.log_weight_histogram(max_bins=60)
            ax.stairs(counts, edges, fill=True, color="tab:blue")
            # the x-axis spans the data (a margin of 5% each side), not the clip range: with the
            # defaults (-10, 5) most corpora would be a sliver; a clip bound is drawn where it is in view
            pad = max(0.05 * (edges[-1] - edges[0]), 1e-3)
            view = (edges[0] - pad, edges[-1] + pad)
            ax.set_xlim(*view)
        else:
            view = st.log_weight_clip
        for bound in st.log_weight_clip:
            if view[0] <= bound <= view[1]:
                ax.axvline(bound, color="tab:red", lw=0.8, ls="--")
        ax.set_title(variant + (" (in shards)" if variant == in_shards else ""))
        ax.set_xlabel("log G (clipped)")
    for ax in axes.flat[n:]:  # the unused end of the last row
        fig.delaxes(ax)
    for row in axes:
        row[0].set_ylabel("response tokens")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def check_image_name(png: str) -> None:
    """ConfigError when `png` ends in a suffix matplotlib cannot write (`out.txt`), before any shard is
    read: matplotlib would refuse it only at the end, with a traceback."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = as_path(png).suffix.lower().lstrip(".") if png else ""
    if suffix and suffix not in kinds:
        raise ConfigError(f"--png {png}: an image file ends in .png, .svg, .pdf or another of "
                          f"{', '.join('.' + k for k in sorted(kinds))}, not .{suffix}")


def inspect(cfg: InspectConfig) -> tuple[dict, str]:
    """Write the histogram; returns the run's summary.json ({} without one) and the image's path.
    ShardError, FileNotFoundError or StorageError (a ConfigError): the shards cannot be read."""
    check_image_name(cfg.png)
    # histograms of every variant's log-weights, shard by shard, under the shards' constants
    shards = list_shards(cfg.scores)  # a local folder or an object-storage URI
    if not shards:
        raise ShardError(f"no shards in {cfg.scores}")
    params, meta = shard_params(shards[0])
    stats = VariantStats(params, variants=tuple(v for v in VARIANTS if v != "none"))
    for s in shards:
        stats.add_shard(s)

    # the figure, then the summary to print
    fig = plot_log_weights(stats.stats, meta["variant"], f"PEAR log-weights, {cfg.scores}")
    import matplotlib.pyplot as plt

    png = as_path(cfg.png or as_path(cfg.scores) / "log_weights.png")
    if isinstance(png, Path):
        fig.savefig(png, dpi=110)
    else:  # object storage: matplotlib writes to a stream
        with png.open("wb") as f:
            fig.savefig(f, dpi=110, format=png.suffix[1:] or "png")
    plt.close(fig)
    summary = as_path(cfg.scores) / "summary.json"
    return (json.loads(summary.read_text()) if summary.exists() else {}), str(png)


def report(done: tuple[dict, str]) -> str:
    from scorer.summary import format_summary

    summary, png = done
    # a scoring run's summary; `reweight` alone writes only params and variants
    return (format_summary(summary) + "\n" if "rows_in" in summary else "") + f"histogram: {png}"


def main(argv=None) -> int:
    return cli(InspectConfig, argv, __doc__, inspect, report, errors=(ShardError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
