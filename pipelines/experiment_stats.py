"""The experiment's statistics: world draws, then seeds, then prompts.

Every arm is evaluated on the same held-out prompts as every other arm of its world draw and seed,
so differences are paired by prompt, seed and world. One world draw is one sample of the world's
build (another seed or another machine builds another draw), and the draws are the top level: an
interval says what another set of draws would show only if it counts them as the units they are.

So every interval over several draws is a t-interval on the per-draw means (each the mean over the
draw's seeds and prompts; the paired difference of two arms is the per-draw mean of the paired
differences) with n - 1 degrees of freedom, and the minimum detectable difference (two-sided 5%,
80% power) is (t(0.975, n - 1) + z(0.8)) standard errors. The prompts' and seeds' noise is inside
each draw's mean, so the spread of the draws' means already counts it. A percentile bootstrap over
three draws has 10 distinct resamples and spans about the range of the three values: its "95%"
interval covered a known effect 79% of the time in simulation (3 draws, between-draw SD 0.05;
tests/test_experiment_stats.py).
With a single draw (the smoke run, a world-selection probe) there is no between-draw spread to
measure, and the interval falls back to a bootstrap over the draw's seeds and prompts, named as such.

Data: one (seeds, prompts) array per world; worlds may differ in their prompt counts (each world's
own corpus decides which evaluation prompts are held out).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

BOOTSTRAP = 2000
LEVEL = 0.95
Z_POWER = NormalDist().inv_cdf(0.8)  # 80% power: 0.8416


# ---- Student's t, without scipy -------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile({p}, {df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


# ---- intervals over draws --------------------------------------------------------------------------

def t_interval(units: np.ndarray, level: float = LEVEL) -> dict[str, np.ndarray]:
    """t-interval on the mean of per-unit values, vectorised: `units` is (..., n), one value per world
    draw; returns arrays of the leading shape: mean, lo, hi, se, mdd. n - 1 degrees of freedom."""
    units = np.asarray(units, dtype=np.float64)
    n = units.shape[-1]
    if n < 2:
        raise ValueError("a t-interval needs at least 2 units")
    t = t_quantile(0.5 + level / 2, n - 1)
    mean = units.mean(axis=-1)
    se = units.std(axis=-1, ddof=1) / math.sqrt(n)
    return {"mean": mean, "lo": mean - t * se, "hi": mean + t * se, "se": se, "mdd": (t + Z_POWER) * se}


def percentile_bootstrap(units: np.ndarray, resamples: int, rng: np.random.Generator,
                         level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The earlier interval's top level, vectorised: percentile bootstrap of the mean of `units`
    (..., n) over resampled units. Kept to show, in tests, why it is no longer used."""
    n = units.shape[-1]
    idx = rng.integers(0, n, size=(*units.shape[:-1], resamples, n))  # (..., R, n)
    means = np.take_along_axis(units[..., None, :], idx, axis=-1).mean(axis=-1)  # (..., R)
    return np.quantile(means, (1 - level) / 2, axis=-1), np.quantile(means, (1 + level) / 2, axis=-1)


def two_level_bootstrap(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means of a (seeds, prompts) array: seeds resampled, then prompts within each seed."""
    rng = np.random.default_rng(seed)
    S, P = x.shape
    s_idx = rng.integers(0, S, size=(resamples, S))  # (R, S)
    p_idx = rng.integers(0, P, size=(resamples, S, P))  # (R, S, P)
    return x[s_idx[..., None], p_idx].mean(axis=(1, 2))  # (R,)


def estimate(xs: list[np.ndarray], seed: int = 0) -> dict:
    """Mean (of the worlds' means), 95% interval, standard error, minimum detectable difference and the
    method, of per-world (seeds, prompts) arrays; also each world's mean and each world's seeds' means.
    Several draws: the t-interval on the draws' means. One draw: a bootstrap over its seeds and prompts."""
    per_world = np.array([x.mean() for x in xs])
    out = {"mean": float(per_world.mean()), "per_world": [float(v) for v in per_world],
           "per_seed": [[float(v) for v in x.mean(axis=1)] for x in xs], "n": len(xs)}
    if len(xs) >= 2:
        e = t_interval(per_world)
        t = t_quantile(0.5 + LEVEL / 2, len(xs) - 1)
        return {**out, "ci95": [float(e["lo"]), float(e["hi"])], "se": float(e["se"]), "mdd": float(e["mdd"]),
                "df": len(xs) - 1, "t": t, "method": f"t-interval over {len(xs)} world draws ({len(xs) - 1} df)"}
    means = two_level_bootstrap(xs[0], BOOTSTRAP, seed)
    se = float(means.std(ddof=1))
    return {**out, "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))], "se": se,
            "mdd": (NormalDist().inv_cdf(0.975) + Z_POWER) * se, "df": None, "t": None,
            "method": "bootstrap over the seeds and prompts of one world draw (no between-draw spread)"}


def fieller(num: np.ndarray, den: np.ndarray, level: float = LEVEL) -> dict:
    """Fieller's interval for mean(num) / mean(den) from paired per-draw values (n - 1 df).

    The ratio R is in the interval where |mean(num) - R mean(den)| <= t * SE(num - R den); with the
    per-draw sample (co)variances over n, that is the quadratic
        R^2 (d^2 - t^2 v_dd) - 2 R (a d - t^2 v_ad) + (a^2 - t^2 v_aa) <= 0.
    When d^2 <= t^2 v_dd (the denominator is not distinguishable from 0) the set is unbounded and the
    interval is reported as (None, None)."""
    a_, d_ = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n = len(a_)
    t2 = t_quantile(0.5 + level / 2, n - 1) ** 2
    a, d = a_.mean(), d_.mean()
    cov = np.cov(np.stack([a_, d_]), ddof=1) / n
    v_aa, v_ad, v_dd = cov[0, 0], cov[0, 1], cov[1, 1]
    share = float(a / d) if d != 0 else None
    qa, qb, qc = d * d - t2 * v_dd, a * d - t2 * v_ad, a * a - t2 * v_aa
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return {"share": share, "lo": None, "hi": None, "bounded": False, "method": f"Fieller, {n - 1} df"}
    root = math.sqrt(disc)
    return {"share": share, "lo": float((qb - root) / qa), "hi": float((qb + root) / qa), "bounded": True,
            "method": f"Fieller, {n - 1} df"}


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
    """A reference, no longer the gate: no-SFT's post-RL pass@1 at least `margin` below uniform's, with
    the 95% interval of the difference below 0."""
    lo, hi = diff["ci95"]
    return {"diff": diff["mean"], "lo": lo, "hi": hi, "se": diff["se"], "per_world": diff["per_world"],
            "method": diff.get("method"),
            "rule": f"no-sft minus uniform, post-RL pass@1: mean <= -{margin} and the 95% interval below 0",
            "holds": bool(diff["mean"] <= -margin and hi < 0)}


def oracle_gate(diff: dict, margin: float) -> dict:
    """The gate: can weighting the SFT data change where RL ends in this world? The oracle arm (SFT on
    only the traces the target can carry out) minus uniform, post-RL pass@1, at least `margin` with
    the 95% interval above 0."""
    lo, hi = diff["ci95"]
    return {"diff": diff["mean"], "lo": lo, "hi": hi, "se": diff["se"], "mdd": diff["mdd"],
            "per_world": diff["per_world"], "method": diff.get("method"),
            "rule": f"oracle minus uniform, post-RL pass@1: mean >= +{margin} and the 95% interval above 0",
            "holds": bool(diff["mean"] >= margin and lo > 0)}
