"""Rewrite only the weights of scored shards from their stored logprobs (no scoring again).

    python -m scorer.reweight --scores runs/score --variant block [--block-size 4] [--gamma 0.999]

Each shard is rewritten atomically with the new weights and the new constants in its `pear`
metadata; summary.json gets the new variant's diagnostics.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scorer.config import field, parse
from scorer.shards import ShardError, list_shards, read_meta, write_atomic, write_json_atomic
from scorer.stats import all_variant_stats
from scorer.weights import WeightParams, ragged_weights


@dataclass
class ReweightConfig:
    """New PEAR weights for existing shards."""

    scores: str = field("runs/score", "scoring output folder")
    variant: str = field("token", "sequence, token, block or none")
    gamma: float = field(0.999, "discount of the token and block variants")
    block_size: int = field(4, "tokens per block (block variant)")
    delta_clip: tuple[float, ...] = field((-0.08, 0.3), "clip of the per-token log-ratio, lo,hi")
    log_weight_clip: tuple[float, ...] = field((-10.0, 5.0), "clip of log G, lo,hi")


def reweight(scores: Path, params: WeightParams) -> dict:
    """Rewrite every shard's weights; returns the updated summary."""
    shards = list_shards(scores)
    if not shards:
        raise ShardError(f"{scores}: no shards to reweight")
    all_t, all_b = [], []
    for path in shards:
        meta = read_meta(path)
        table = pq.read_table(path)
        target = [np.asarray(x, np.float32) for x in table.column("target_logprobs").to_pylist()]
        behavior = [np.asarray(x, np.float32) for x in table.column("behavior_logprobs").to_pylist()]
        weights, _ = ragged_weights(target, behavior, params)
        col = pa.array(weights, pa.list_(pa.float32()))
        table = table.set_column(table.column_names.index("weights"), "weights", col)
        write_atomic(table, path, {**meta, **params.as_dict()})
        all_t += target
        all_b += behavior
    summary_path = Path(scores) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["params"] = params.as_dict()
    summary["variants"] = all_variant_stats(all_t, all_b, params)
    write_json_atomic(summary, summary_path)
    return summary


def main(argv=None) -> int:
    cfg = parse(ReweightConfig, argv, description=__doc__)
    try:
        params = WeightParams(cfg.variant, cfg.gamma, cfg.block_size, tuple(cfg.delta_clip), tuple(cfg.log_weight_clip))
        reweight(Path(cfg.scores), params)
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reweighted {cfg.scores} with {params.as_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
