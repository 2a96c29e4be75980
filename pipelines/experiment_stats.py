"""The experiment's statistics: world draws, then seeds, then prompts.

Every arm is evaluated on the same held-out prompts as every other arm of its world draw and seed,
so differences are paired by prompt, seed and world. One world draw is one sample of the world's
build (another machine builds another draw), so intervals resample worlds, then seeds within each
world, then prompts within each seed. The minimum detectable difference (80% power, two-sided 5%)
is 2.8 standard errors of that bootstrap.

Data: one (seeds, prompts) array per world; worlds may differ in their prompt counts (each world's
own corpus decides which evaluation prompts are held out).
"""
from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000
Z_POWER = 1.96 + 0.84  # two-sided 5% test with 80% power: the difference must be 2.8 standard errors


def two_level_bootstrap(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means of a (seeds, prompts) array: seeds resampled, then prompts within each seed."""
    rng = np.random.default_rng(seed)
    S, P = x.shape
    s_idx = rng.integers(0, S, size=(resamples, S))  # (R, S)
    p_idx = rng.integers(0, P, size=(resamples, S, P))  # (R, S, P)
    return x[s_idx[..., None], p_idx].mean(axis=(1, 2))  # (R,)


def three_level_bootstrap(xs: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means over worlds of per-world (seeds, prompts) arrays: worlds resampled, then
    seeds and prompts within each drawn world. Each world counts once, whatever its prompt count."""
    rng = np.random.default_rng(seed)
    within = np.stack([two_level_bootstrap(x, resamples, seed + 1 + w) for w, x in enumerate(xs)])  # (W, R)
    w_idx = rng.integers(0, len(xs), size=(resamples, len(xs)))  # (R, W)
    return within[w_idx, np.arange(resamples)[:, None]].mean(axis=1)  # (R,)


def estimate(xs: list[np.ndarray], seed: int = 0) -> dict:
    """Mean (of the worlds' means), 95% interval, standard error and minimum detectable difference of
    per-world (seeds, prompts) arrays; also each world's mean and each world's seeds' means."""
    means = three_level_bootstrap(xs, BOOTSTRAP, seed)
    se = float(means.std(ddof=1))
    return {"mean": float(np.mean([x.mean() for x in xs])),
            "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "se": se, "mdd": Z_POWER * se, "per_world": [float(x.mean()) for x in xs],
            "per_seed": [[float(v) for v in x.mean(axis=1)] for x in xs]}


def area_under_curve(points: np.ndarray, steps: list[int]) -> np.ndarray:
    """Mean height of a curve over RL steps (trapezoids, divided by the span): `points` is
    (..., len(steps)), one value per step; the result has the leading shape."""
    widths = np.diff(np.asarray(steps, dtype=np.float64))  # (N-1,)
    heights = (points[..., 1:] + points[..., :-1]) / 2
    return (heights * widths).sum(axis=-1) / (steps[-1] - steps[0])


def excludes_zero(e: dict) -> bool:
    return e["ci95"][0] > 0 or e["ci95"][1] < 0


def verdict(e: dict, better: str = "better than uniform", worse: str = "worse than uniform",
            neither: str = "not distinguishable from uniform") -> str:
    return better if e["ci95"][0] > 0 else worse if e["ci95"][1] < 0 else neither


def sft_matters(diff: dict, margin: float) -> dict:
    """The rule that chooses the experiment's world, from the no-SFT and uniform arms alone: no-SFT's
    post-RL pass@1 at least `margin` below uniform's, with the 95% interval of the difference below 0."""
    lo, hi = diff["ci95"]
    return {"diff": diff["mean"], "lo": lo, "hi": hi, "se": diff["se"], "per_world": diff["per_world"],
            "rule": f"no-sft minus uniform, post-RL pass@1: mean <= -{margin} and the 95% interval below 0",
            "holds": bool(diff["mean"] <= -margin and hi < 0)}
