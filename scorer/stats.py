"""Diagnostics of a weighting: quantiles, clip-bound shares and effective sample sizes.

The statistics are accumulated batch by batch (`WeightStats`, one per variant; `VariantStats`, all
variants at once) so that a corpus of any size is summarized shard by shard in constant memory,
and partial results from several workers merge exactly.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scorer.shards import ShardError
from scorer.weights import VARIANTS, WeightParams, ragged_weights

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
HIST_BINS = 1 << 16  # log-weight histogram bins over log_weight_clip: 15/65536 = 2.3e-4 for (-10, 5)
BATCH_ROWS = 1024  # rows read and weighed at a time; bounds memory for any shard size
LOGPROB_COLUMNS = ("target_logprobs", "behavior_logprobs")
CLIP_EPS = 1e-5  # log-weights this close to a clip bound count as clipped (float32 storage)


def ess(w: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2 (equals len(w) for equal weights)."""
    w = np.asarray(w, dtype=np.float64)
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


class WeightStats:
    """Mergeable diagnostics of one weighting, fed with batches of ragged rows.

    Means, clip shares and both effective sample sizes come from exact counts and float64 running
    sums (of w, w^2, and of each sequence's mean weight and its square). Quantiles come from a
    histogram of log G on `bins` equal bins over `params.log_weight_clip` (log G is clipped to that
    range, so every value lands in a bin), plus the exact minimum and maximum: each order statistic
    is read as the centre of its bin (clamped to [min, max]; the first and last are exact) and
    interpolated linearly as `np.quantile` does. A log-weight quantile is therefore within half a
    bin width, `quantile_resolution = (hi - lo) / bins` in log space (2.3e-4 with the defaults),
    of the exact one, and a weight quantile, built from exp of the same order statistics, within
    a factor exp(resolution / 2). Memory is the histogram (8 bytes a bin), whatever the row count.
    """

    def __init__(self, params: WeightParams, bins: int = HIST_BINS):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.log_weight_clip = params.log_weight_clip
        self.delta_clip = params.delta_clip
        self.bins = bins
        lo, hi = self.log_weight_clip
        self.bin_width = (hi - lo) / bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.tokens = 0
        self.sequences = 0
        self.sum_w = 0.0
        self.sum_w2 = 0.0
        self.sum_seq_w = 0.0  # sum over sequences of the sequence's mean weight
        self.sum_seq_w2 = 0.0
        self.at_log_clip = np.zeros(2, dtype=np.int64)  # tokens at the (lo, hi) log-weight clip
        self.at_delta_clip = np.zeros(2, dtype=np.int64)  # tokens whose raw log-ratio is clipped (lo, hi)
        self.log_min = math.inf
        self.log_max = -math.inf

    def add(self, weights: list[np.ndarray], log_weights: list[np.ndarray], target: list[np.ndarray],
            behavior: list[np.ndarray]) -> None:
        """Add a batch of rows: per-row weights, clipped log-weights and the two policies' logprobs."""
        lengths = np.array([len(x) for x in weights], dtype=np.int64)
        n = int(lengths.sum())
        if n == 0:
            return
        w = np.concatenate(weights).astype(np.float64)  # (N,) all tokens of the batch
        lw = np.concatenate(log_weights).astype(np.float64)
        delta = np.concatenate(target).astype(np.float64) - np.concatenate(behavior).astype(np.float64)
        if not np.isfinite(lw).all():
            raise ValueError("non-finite log-weights (NaN logprobs in the input?)")
        lo, hi = self.log_weight_clip
        dlo, dhi = self.delta_clip

        # one mean weight per non-empty sequence; reduceat over the starts of the non-empty rows
        # sums exactly each of them, since the empty rows in between hold no tokens
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        seq_w = np.add.reduceat(w, starts) / lengths[lengths > 0]

        self.tokens += n
        self.sequences += len(seq_w)
        self.sum_w += float(w.sum())
        self.sum_w2 += float((w * w).sum())
        self.sum_seq_w += float(seq_w.sum())
        self.sum_seq_w2 += float((seq_w * seq_w).sum())
        self.at_log_clip += [(lw <= lo + CLIP_EPS).sum(), (lw >= hi - CLIP_EPS).sum()]
        self.at_delta_clip += [(delta <= dlo).sum(), (delta >= dhi).sum()]
        self.log_min = min(self.log_min, float(lw.min()))
        self.log_max = max(self.log_max, float(lw.max()))
        self.hist += np.bincount(self._bin(lw), minlength=self.bins)

    def _bin(self, lw: np.ndarray) -> np.ndarray:
        if self.bin_width == 0:
            return np.zeros(len(lw), dtype=np.int64)
        # float32 rounding can put a value a hair outside the clip range: it belongs to the end bin
        return np.clip(np.floor((lw - self.log_weight_clip[0]) / self.bin_width), 0, self.bins - 1).astype(np.int64)

    def merge(self, other: WeightStats) -> WeightStats:
        """Add another accumulator's counts (same constants and bins) into this one; returns self."""
        if (other.log_weight_clip, other.delta_clip, other.bins) != (self.log_weight_clip, self.delta_clip, self.bins):
            raise ValueError("cannot merge weight statistics with other clips or bins")
        self.hist += other.hist
        self.tokens += other.tokens
        self.sequences += other.sequences
        self.sum_w += other.sum_w
        self.sum_w2 += other.sum_w2
        self.sum_seq_w += other.sum_seq_w
        self.sum_seq_w2 += other.sum_seq_w2
        self.at_log_clip += other.at_log_clip
        self.at_delta_clip += other.at_delta_clip
        self.log_min = min(self.log_min, other.log_min)
        self.log_max = max(self.log_max, other.log_max)
        return self

    def _order_stat(self, k: int, cum: np.ndarray) -> float:
        """Estimate of the k-th smallest log-weight (0-based)."""
        if k == 0:
            return self.log_min
        if k == self.tokens - 1:
            return self.log_max
        i = int(np.searchsorted(cum, k, side="right"))  # first bin holding more than k values
        centre = self.log_weight_clip[0] + (i + 0.5) * self.bin_width
        return min(max(centre, self.log_min), self.log_max)

    def _quantiles(self) -> tuple[dict, dict]:
        cum = np.cumsum(self.hist)
        log_q, w_q = {}, {}
        for q in QUANTILES:
            pos = q * (self.tokens - 1)  # np.quantile's "linear" method
            k = math.floor(pos)
            f = pos - k
            a = self._order_stat(k, cum)
            b = self._order_stat(k + 1, cum) if f > 0 else a
            log_q[f"p{int(q * 100)}"] = a + f * (b - a)
            w_q[f"p{int(q * 100)}"] = math.exp(a) + f * (math.exp(b) - math.exp(a))
        return log_q, w_q

    def log_weight_histogram(self, max_bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of log G over the bins the data spans, regrouped into at most `max_bins`."""
        if self.tokens == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1)
        if self.bin_width == 0:  # lo == hi: every value is that bound
            return self.hist[:1].copy(), np.array([self.log_min - 0.5, self.log_max + 0.5])
        first, last = np.flatnonzero(self.hist)[[0, -1]]
        group = -(-(last - first + 1) // max_bins)
        counts = self.hist[first:last + 1]
        counts = np.add.reduceat(counts, np.arange(0, len(counts), group))
        edges = self.log_weight_clip[0] + self.bin_width * (first + group * np.arange(len(counts) + 1))
        return counts, edges

    def result(self) -> dict:
        """The diagnostics dict; `quantile_resolution`: the histogram bin width the quantiles are exact to."""
        if self.tokens == 0:
            return {"tokens": 0, "sequences": 0}
        log_q, w_q = self._quantiles()
        ess_tokens = self.sum_w ** 2 / self.sum_w2 if self.sum_w2 > 0 else 0.0
        ess_sequences = self.sum_seq_w ** 2 / self.sum_seq_w2 if self.sum_seq_w2 > 0 else 0.0
        return {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "weight_quantiles": w_q,
            "weight_mean": self.sum_w / self.tokens,
            "log_weight_quantiles": log_q,
            "quantile_resolution": self.bin_width,
            "share_at_log_weight_clip": {"lo": int(self.at_log_clip[0]) / self.tokens,
                                         "hi": int(self.at_log_clip[1]) / self.tokens},
            "share_at_delta_clip": {"lo": int(self.at_delta_clip[0]) / self.tokens,
                                    "hi": int(self.at_delta_clip[1]) / self.tokens},
            "ess_tokens": ess_tokens,
            "ess_tokens_fraction": ess_tokens / self.tokens,
            "ess_sequences": ess_sequences,
            "ess_sequences_fraction": ess_sequences / self.sequences,
        }


class VariantStats:
    """A `WeightStats` for every variant under the same constants, so users can compare them."""

    def __init__(self, params: WeightParams, variants: tuple[str, ...] = VARIANTS, bins: int = HIST_BINS):
        self.params = {v: dataclasses.replace(params, variant=v) for v in variants}
        self.stats = {v: WeightStats(p, bins) for v, p in self.params.items()}
        self.rows = 0
        self.tokens = 0  # response tokens

    def add(self, target: list[np.ndarray], behavior: list[np.ndarray]) -> dict[str, tuple[list, list]]:
        """Weigh a batch of rows under every variant and add it; returns {variant: (weights, log_weights)}."""
        self.rows += len(target)
        self.tokens += sum(len(x) for x in target)
        computed = {}
        for v, p in self.params.items():
            w, lw = ragged_weights(target, behavior, p)
            self.stats[v].add(w, lw, target, behavior)
            computed[v] = (w, lw)
        return computed

    def add_shard(self, path: Path, batch_rows: int = BATCH_ROWS) -> None:
        """Add every row of one shard, `batch_rows` at a time; ShardError names an unreadable file."""
        first_row = 0
        for target, behavior in read_logprobs(path, batch_rows):
            try:
                self.add(target, behavior)
            except ValueError as e:
                raise ShardError(f"{path}: rows from {first_row}: {e}") from None
            first_row += len(target)

    def merge(self, other: VariantStats) -> VariantStats:
        if set(other.stats) != set(self.stats):
            raise ValueError("cannot merge statistics of other variants")
        for v, st in self.stats.items():
            st.merge(other.stats[v])
        self.rows += other.rows
        self.tokens += other.tokens
        return self

    def result(self) -> dict:
        """{variant: `WeightStats.result()`}."""
        return {v: st.result() for v, st in self.stats.items()}


def stats_of_shards(paths: list[Path], params: WeightParams, progress=None) -> dict:
    """`VariantStats.result()` of every row of these shards, read one batch of rows at a time.

    Memory does not grow with the number of shards or rows. Every variant's `tokens` is the total
    response token count. A shard that cannot be read raises ShardError naming the file.
    `progress`: true for a progress bar (drivers only).
    """
    from tqdm import tqdm

    acc = VariantStats(params)
    for path in tqdm(paths, desc="weight statistics", unit="shard", disable=not progress):
        acc.add_shard(path)
    return acc.result()


def read_logprobs(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """(target, behavior) ragged float32 rows of one shard, `batch_rows` rows at a time."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from e
    with pf:
        missing = [c for c in LOGPROB_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ShardError(f"{path}: missing columns {missing}")
        batches = pf.iter_batches(batch_size=batch_rows, columns=list(LOGPROB_COLUMNS))
        first_row = 0
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"{path}: cannot read ({e})") from e
            if batch is None:
                return
            yield logprob_rows(batch, path, first_row)
            first_row += batch.num_rows


def logprob_rows(data: pa.Table | pa.RecordBatch, path: Path, first_row: int = 0) -> tuple[list, list]:
    """The target and behavior logprob columns as ragged float32 rows, checked for equal lengths."""
    rows, lengths = [], []
    for name in LOGPROB_COLUMNS:
        col = data.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if col.null_count:
            r = first_row + col.is_null().to_numpy(zero_copy_only=False).argmax()
            raise ShardError(f"{path}: row {r}: {name} is null")
        offsets = col.offsets.to_numpy()
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a writable copy
        rows.append(np.split(values, offsets[1:-1] - offsets[0]) if len(col) else [])
        lengths.append(np.diff(offsets))
    if not np.array_equal(*lengths):
        r = int(np.flatnonzero(lengths[0] != lengths[1])[0])
        raise ShardError(f"{path}: row {first_row + r}: {lengths[0][r]} target_logprobs but "
                         f"{lengths[1][r]} behavior_logprobs")
    return rows[0], rows[1]


class WeightRow(NamedTuple):
    """One variant's line of the weight table (`weight_table`): a tuple, so that a tracker takes it as
    a table row, with its columns named (`TABLE_COLUMNS`)."""

    variant: str
    written: bool  # the variant stored in the shards
    p1: float  # weight quantiles
    p50: float
    p99: float
    mean: float
    log_clip_lo: float  # share of tokens at each bound of the log-weight clip
    log_clip_hi: float
    delta_clip_lo: float  # share of tokens at each bound of the delta clip
    delta_clip_hi: float
    ess_tokens_fraction: float  # ESS as a share of tokens
    ess_sequences_fraction: float  # and of sequences


TABLE_COLUMNS = WeightRow._fields


def weight_table(summary: dict) -> list[WeightRow]:
    """One row per variant of a scoring summary: weight quantiles and mean, shares of tokens at each
    clip, ESS fractions; `written` marks the variant stored in the shards."""
    rows = []
    for v, st in summary.get("variants", {}).items():
        if not st.get("tokens"):
            continue
        q, lc, dc = st["weight_quantiles"], st["share_at_log_weight_clip"], st["share_at_delta_clip"]
        rows.append(WeightRow(v, v == summary["params"]["variant"], q["p1"], q["p50"], q["p99"], st["weight_mean"],
                              lc["lo"], lc["hi"], dc["lo"], dc["hi"], st["ess_tokens_fraction"],
                              st["ess_sequences_fraction"]))
    return rows
