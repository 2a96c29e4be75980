"""Diagnostics of a weighting: quantiles, clip-bound shares and effective sample sizes."""
from __future__ import annotations

import numpy as np

from scorer.weights import VARIANTS, WeightParams, ragged_weights

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def ess(w: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2 (equals len(w) for equal weights)."""
    w = np.asarray(w, dtype=np.float64)
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def weight_stats(weights: list[np.ndarray], log_weights: list[np.ndarray], target: list[np.ndarray],
                 behavior: list[np.ndarray], params: WeightParams) -> dict:
    """Distribution of one weighting over a corpus (ragged per-row arrays)."""
    n_tokens = int(sum(len(w) for w in weights))
    if n_tokens == 0:
        return {"tokens": 0, "sequences": 0}
    w = np.concatenate(weights).astype(np.float64)
    lw = np.concatenate(log_weights).astype(np.float64)
    delta = np.concatenate(target).astype(np.float64) - np.concatenate(behavior).astype(np.float64)
    lo, hi = params.log_weight_clip
    dlo, dhi = params.delta_clip
    eps = 1e-5
    seq_w = np.array([x.mean() for x in weights if len(x)], dtype=np.float64)  # one weight per sequence
    return {
        "tokens": n_tokens,
        "sequences": len(seq_w),
        "weight_quantiles": {f"p{int(q * 100)}": float(np.quantile(w, q)) for q in QUANTILES},
        "weight_mean": float(w.mean()),
        "log_weight_quantiles": {f"p{int(q * 100)}": float(np.quantile(lw, q)) for q in QUANTILES},
        "share_at_log_weight_clip": {"lo": float((lw <= lo + eps).mean()), "hi": float((lw >= hi - eps).mean())},
        "share_at_delta_clip": {"lo": float((delta <= dlo).mean()), "hi": float((delta >= dhi).mean())},
        "ess_tokens": ess(w),
        "ess_tokens_fraction": ess(w) / n_tokens,
        "ess_sequences": ess(seq_w),
        "ess_sequences_fraction": ess(seq_w) / len(seq_w),
    }


def all_variant_stats(target: list[np.ndarray], behavior: list[np.ndarray], params: WeightParams) -> dict:
    """`weight_stats` for every variant under the same constants, so users can compare them."""
    out = {}
    for variant in VARIANTS:
        p = WeightParams(variant, params.gamma, params.block_size, params.delta_clip, params.log_weight_clip)
        w, lw = ragged_weights(target, behavior, p)
        out[variant] = weight_stats(w, lw, target, behavior, p)
    return out
