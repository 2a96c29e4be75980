"""Scored shards -> training rows, a held-out split, and token-budget micro-batches.

The trainer uses the shards' `input_ids` as they are (never re-tokenizes: the weights are per
token of exactly these ids); the scored tokens are those of `response_spans` (every assistant
turn). Every rank reads an index of every shard (id and lengths of each row) and builds the same
plan; a rank then takes its share of each step's micro-batches and reads only those rows, a row
group at a time, so memory stays flat in corpus size and the training does not depend on the
number of ranks.

Plan of one epoch: rows sorted by length (random tie-break, seeded by seed and epoch), cut
greedily into micro-batches whose padded size (rows x longest row) stays under the token budget,
then the micro-batches shuffled. Sorting keeps padding small; padding is never scored.
The data position of a run is (epoch, micro-batch index in the epoch's plan).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from common.batching import padded_batches
from scorer.shards import ShardError, check_meta, check_table, list_shards, spans_of
from scorer.weights import WeightParams

# shard metadata that must agree across shards: one weighting (every constant of it), one target, one tokenizer
SAME_ACROSS_SHARDS = (*WeightParams().as_dict(), "target_model", "tokenizer_sha256")


@dataclass
class Rows:
    """Columnar training rows in memory (ragged per-row arrays)."""

    ids: list[str]
    input_ids: list[np.ndarray]  # int64 (L_i,)
    prompt_lens: np.ndarray  # int64 (n,): tokens before the first scored one
    target_logprobs: list[np.ndarray]  # float32 (R_i,): one per scored token, spans in order
    behavior_logprobs: list[np.ndarray]  # float32, same
    weights: list[np.ndarray]  # float32, same: the PEAR weights stored by the scorer
    spans: list[np.ndarray] | None = None  # int64 (k_i, 2) [start, end); None: one span, prompt_len to the end

    def __post_init__(self):
        if self.spans is None:
            self.spans = [np.array([[p, len(x)]], np.int64) for p, x in zip(self.prompt_lens, self.input_ids)]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def response_lengths(self) -> np.ndarray:
        return np.array([int((sp[:, 1] - sp[:, 0]).sum()) for sp in self.spans], dtype=np.int64)

    def subset(self, index) -> "Rows":
        index = [int(i) for i in index]
        pick = lambda col: [col[i] for i in index]
        return Rows(pick(self.ids), pick(self.input_ids), self.prompt_lens[index], pick(self.target_logprobs),
                    pick(self.behavior_logprobs), pick(self.weights), pick(self.spans))

    take = subset  # the rows' data, in memory (ShardRows reads it from disk)

    def fingerprint(self) -> str:
        """Hash of the ids and lengths: a resumed run must see the same rows in the same plan."""
        return _fingerprint(self.ids, self.lengths, self.prompt_lens, "")


def _fingerprint(ids, lengths, prompt_lens, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for i, n, p in zip(ids, lengths, prompt_lens):
        h.update(f"{i}\0{n}\0{p}\n".encode())
    return h.hexdigest()


def _ragged(table, name: str, dtype) -> list[np.ndarray]:
    return [np.asarray(x, dtype=dtype) for x in table.column(name).to_numpy(zero_copy_only=False)]


def _rows_of(table) -> Rows:
    spans = [np.array(sp, np.int64).reshape(-1, 2) for sp in spans_of(table)]
    return Rows([str(x) for x in table.column("id").to_pylist()], _ragged(table, "input_ids", np.int64),
                np.asarray(table.column("prompt_len").to_pylist(), dtype=np.int64),
                _ragged(table, "target_logprobs", np.float32), _ragged(table, "behavior_logprobs", np.float32),
                _ragged(table, "weights", np.float32), spans)


def _row(rows: Rows, r: int, copy: bool = False) -> tuple:
    """Row `r` of `rows` as a tuple in the order of Rows' fields (arrays copied if asked)."""
    arr = (lambda x: x.copy()) if copy else (lambda x: x)
    return (rows.ids[r], arr(rows.input_ids[r]), rows.prompt_lens[r], arr(rows.target_logprobs[r]),
            arr(rows.behavior_logprobs[r]), arr(rows.weights[r]), arr(rows.spans[r]))


class ShardRows:
    """Rows of scored shards, read on demand. Held in memory: per row its id, shard, row-group and
    lengths; the token data of a row group is read when a micro-batch needs it and kept in a small
    least-recently-used cache."""

    def __init__(self, paths: list[Path], ids: list[str], where: np.ndarray, lengths: np.ndarray,
                 prompt_lens: np.ndarray, response_lengths: np.ndarray, made_from: str, cache_groups: int = 8):
        self.paths, self.ids, self.where = paths, ids, where  # where: (n, 3) int64 shard, row group, row in group
        self.lengths, self.prompt_lens, self.response_lengths = lengths, prompt_lens, response_lengths
        self.made_from, self.cache_groups = made_from, cache_groups
        self._cache: OrderedDict[tuple[int, int], Rows] = OrderedDict()
        self._window: dict[tuple[int, int, int], tuple] = {}  # (shard, group, row) -> the row's data

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> "ShardRows":
        index = np.asarray([int(i) for i in index], dtype=np.int64)
        view = ShardRows(self.paths, [self.ids[i] for i in index], self.where[index], self.lengths[index],
                         self.prompt_lens[index], self.response_lengths[index], self.made_from, self.cache_groups)
        view._cache = self._cache  # one cache for the rows and their subsets
        view._window = self._window
        return view

    def prefetch(self, index) -> None:
        """Read the rows `index` now, each of their row groups once, and keep only them (replacing
        the previous window): micro-batches draw rows from all over the corpus, and reading a row
        group per row would read each group many times."""
        where = self.where[np.asarray([int(i) for i in index], dtype=np.int64)]
        wanted: dict[tuple[int, int], list[int]] = {}
        for s, g, r in where.tolist():
            wanted.setdefault((s, g), []).append(r)
        self._window.clear()
        for (s, g), rs in wanted.items():
            grp = self._cache.get((s, g)) or _rows_of(pq.ParquetFile(self.paths[s]).read_row_group(g))
            for r in rs:  # copies: a view would keep its whole row group's Arrow buffers alive
                self._window[(s, g, r)] = _row(grp, r, copy=True)

    def take(self, index) -> Rows:
        """The rows `index` with their token data, in that order (from the prefetched window, else
        from their row group)."""
        found = []
        for s, g, r in self.where[[int(i) for i in index]].tolist():
            row = self._window.get((s, g, r))
            found.append(row if row is not None else _row(self._group(s, g), r))
        ids, input_ids, plens, target, behavior, weights, spans = (list(c) for c in zip(*found))
        return Rows(ids, input_ids, np.array(plens, np.int64), target, behavior, weights, spans)

    def _group(self, shard: int, group: int) -> Rows:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rows = _rows_of(pq.ParquetFile(self.paths[shard]).read_row_group(group))
        self._cache[key] = rows
        if len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return rows

    def fingerprint(self) -> str:
        """Hash of the ids, lengths and every shard's metadata: a resumed run must see the same rows
        in the same plan, made the same way (a `reweight` in between changes the weights)."""
        return _fingerprint(self.ids, self.lengths, self.prompt_lens, self.made_from)


def load_rows(scores: str | Path, vocab_size: int, max_len: int | None = None) -> tuple[ShardRows, dict]:
    """An index of all rows of all shards under `scores`, checked shard by shard (one row group in
    memory at a time); returns (rows, metadata of the first shard).

    Raises ShardError naming the file (and row) for: another schema version, missing columns,
    logprobs or weights of the wrong length, spans out of order, ids outside the vocabulary, a row
    longer than the model's context, or shards made with other settings.
    """
    paths = list_shards(scores)
    if not paths:
        raise ShardError(f"{scores}: no shards (*.parquet) to train on")
    first_meta = None
    made_from = hashlib.sha256()  # every shard's metadata: weighting, source rows, models
    ids: list[str] = []
    where, lengths, plens, rlens = [], [], [], []  # per row group: int32 arrays (no Python int per row)
    for s, path in enumerate(paths):
        meta = check_meta(path)
        made_from.update(json.dumps([path.name, meta], sort_keys=True).encode())
        if first_meta is None:
            first_meta = meta
        for key in SAME_ACROSS_SHARDS:
            if meta.get(key) != first_meta.get(key):
                raise ShardError(f"{path}: {key} {meta.get(key)!r} differs from {paths[0]}'s "
                                 f"{first_meta.get(key)!r}; train on shards made with one setting")
        try:
            pf = pq.ParquetFile(path)
            offset = 0
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g)
                spans = check_table(path, table, vocab_size, first_row=offset)
                n = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int32)
                if max_len is not None and (n > max_len).any():
                    r = int(np.argmax(n > max_len))
                    raise ShardError(f"{path}: row {offset + r}: {n[r]} tokens, longer than the model's context "
                                     f"of {max_len}")
                ids += [str(x) for x in table.column("id").to_pylist()]
                where.append(np.stack([np.full(len(n), s), np.full(len(n), g), np.arange(len(n))], 1).astype(np.int32))
                lengths.append(n)
                plens.append(table.column("prompt_len").to_numpy().astype(np.int32))
                rlens.append(np.array([sum(b - a for a, b in sp) for sp in spans], np.int32))
                offset += table.num_rows
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{path}: cannot read ({e})") from None
    cat = lambda parts, width=None: np.concatenate(parts).astype(np.int64) if parts else \
        np.zeros((0,) if width is None else (0, width), np.int64)
    rows = ShardRows(paths, ids, cat(where, 3), cat(lengths), cat(plens), cat(rlens), made_from.hexdigest())
    return rows, first_meta


def stored_weight_params(meta: dict) -> WeightParams:
    """The weighting the shards' stored weights were made with (from a shard's metadata)."""
    return WeightParams.from_dict(meta)


def is_heldout(row_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id: the same rows are held out in every run and arm."""
    h = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


def parse_only(only: str) -> tuple[str, set[str]]:
    """'style=careful' -> ('style', {'careful'}); 'style=careful|words' -> ('style', {'careful', 'words'})."""
    column, sep, values = only.partition("=")
    if not sep or not column.strip() or not values.strip():
        raise ValueError(f"--only {only!r}: COLUMN=VALUE[|VALUE...], e.g. style=careful")
    return column.strip(), {v.strip() for v in values.split("|")}


def rows_where(rows: ShardRows, column: str, values: set[str]) -> ShardRows:
    """The rows whose pass-through `column` (a corpus column the scorer kept) holds one of `values`,
    read from the shards (that column and the ids only). Raises ShardError naming a shard without it."""
    keep: set[str] = set()
    for path in rows.paths:
        names = pq.ParquetFile(path).schema_arrow.names
        if column not in names:
            raise ShardError(f"{path}: no column {column!r} to select rows by (its columns: {', '.join(names)})")
        table = pq.read_table(path, columns=["id", column])
        keep.update(str(i) for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist())
                    if str(v) in values)
    return rows.subset([i for i, row_id in enumerate(rows.ids) if row_id in keep])


def split_heldout(rows: Rows, fraction: float) -> tuple[Rows, Rows]:
    """(train rows, held-out rows)."""
    held = np.array([is_heldout(i, fraction) for i in rows.ids], dtype=bool)
    return rows.subset(np.flatnonzero(~held)), rows.subset(np.flatnonzero(held))


# ---- the plan --------------------------------------------------------------------------------

def plan_epoch(lengths: np.ndarray, token_budget: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Micro-batches (arrays of row indices) of one epoch; a function of (lengths, budget, seed, epoch).

    rows x longest row <= token_budget, except a single row longer than the budget, alone.
    """
    rng = np.random.default_rng([seed, epoch])
    tiebreak = rng.permutation(len(lengths))
    order = tiebreak[np.argsort(lengths[tiebreak], kind="stable")]
    batches = [np.array(b) for b in padded_batches(order, lengths, token_budget)]
    return [batches[k] for k in rng.permutation(len(batches))]


def steps_of(num_micro_batches: int, per_step: int) -> list[range]:
    """Micro-batch index ranges of the optimizer steps of an epoch (the last step may be short)."""
    return [range(s, min(s + per_step, num_micro_batches)) for s in range(0, num_micro_batches, per_step)]


def rank_share(step: range, rank: int, world_size: int) -> list[int]:
    """The micro-batches of one step that this rank computes (round robin)."""
    return list(step)[rank::world_size]


# ---- tensors ---------------------------------------------------------------------------------

@dataclass
class Batch:
    """One micro-batch: right-padded ids and the flat list of its response tokens."""

    input_ids: torch.Tensor  # (B, L) long, right-padded; pads come after every real token
    rows: torch.Tensor  # (N,) long: row of each response token
    cols: torch.Tensor  # (N,) long: position whose hidden state predicts it (its own position - 1)
    labels: torch.Tensor  # (N,) long: the response token ids
    resp_pos: torch.Tensor  # (N,) long: index within its response (left-aligned layout column)
    weights: torch.Tensor  # (N,) float32: stored PEAR weights
    target_logprobs: torch.Tensor  # (N,) float32
    behavior_logprobs: torch.Tensor  # (N,) float32
    real_tokens: int  # prompt + response tokens, padding excluded
    idle: bool = False  # a rank with no micro-batch in a step still runs one, scaled to zero

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return 0 if self.idle else self.labels.shape[0]

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Batch(**moved)


PREFETCH_ROWS = 16384  # rows read ahead at once: bounds memory, and each row group is read once per window


def collated(rows: Rows | ShardRows, batches: list, max_rows: int = PREFETCH_ROWS):
    """The micro-batches `batches` (arrays of row indices) collated in order, their rows read a
    window of at most `max_rows` rows at a time."""
    i = 0
    while i < len(batches):
        j, n = i, 0
        while j < len(batches) and (n == 0 or n + len(batches[j]) <= max_rows):
            n += len(batches[j])
            j += 1
        if isinstance(rows, ShardRows):
            rows.prefetch(np.concatenate([np.asarray(b) for b in batches[i:j]]))
        for b in batches[i:j]:
            yield collate(rows, b)
        i = j


def collate(rows: Rows | ShardRows, index, pad_id: int = 0) -> Batch:
    """The rows `index` as one right-padded micro-batch; its scored tokens are the spans' tokens."""
    rows = rows.take(index)
    seqs = rows.input_ids
    L = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for j, x in enumerate(seqs):
        input_ids[j, : len(x)] = torch.from_numpy(x)
    positions = [np.concatenate([np.arange(a, b) for a, b in sp]) for sp in rows.spans]  # scored tokens
    r_lens = [len(x) for x in positions]
    b_rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(r_lens))
    resp_pos = torch.cat([torch.arange(n) for n in r_lens])  # index among the row's scored tokens
    cols = torch.from_numpy(np.concatenate(positions)) - 1
    cat = lambda col: torch.from_numpy(np.concatenate(getattr(rows, col)).astype(np.float32))
    return Batch(input_ids, b_rows, cols, input_ids[b_rows, cols + 1], resp_pos, cat("weights"),
                 cat("target_logprobs"), cat("behavior_logprobs"), real_tokens=sum(len(x) for x in seqs))


def idle_batch(pad_id: int = 0) -> Batch:
    """Two pad tokens, one scored position; its loss is multiplied by zero (see Batch.idle).

    DDP needs every rank to run forward/backward in every step; a short last step can leave a
    rank without a micro-batch, and this keeps the plan independent of the number of ranks.
    """
    z = torch.zeros(1, dtype=torch.long)
    return Batch(torch.full((1, 2), pad_id, dtype=torch.long), z, z, z + pad_id, z,
                 torch.zeros(1), torch.zeros(1), torch.zeros(1), real_tokens=0, idle=True)
