"""Scored shards -> training rows, a held-out split, and token-budget micro-batches.

The trainer uses the shards' `input_ids` as they are (never re-tokenizes: the weights are per
token of exactly these ids). Every rank reads every shard and builds the same plan; a rank then
takes its share of each step's micro-batches, so the plan, and hence the training, does not
depend on the number of ranks.

Plan of one epoch: rows sorted by length (random tie-break, seeded by seed and epoch), cut
greedily into micro-batches whose padded size (rows x longest row) stays under the token budget,
then the micro-batches shuffled. Sorting keeps padding small; padding is never scored.
The data position of a run is (epoch, micro-batch index in the epoch's plan).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scorer.shards import ShardError, check_shard, list_shards
from scorer.weights import WeightParams

# shard metadata that must agree across shards: one weighting, one target, one tokenizer
SAME_ACROSS_SHARDS = ("variant", "gamma", "block_size", "delta_clip", "log_weight_clip", "target_model",
                      "tokenizer_sha256")


@dataclass
class Rows:
    """Columnar training rows (ragged per-row arrays); response = input_ids[prompt_len:]."""

    ids: list[str]
    input_ids: list[np.ndarray]  # int64 (L_i,)
    prompt_lens: np.ndarray  # int64 (n,)
    target_logprobs: list[np.ndarray]  # float32 (L_i - prompt_len_i,)
    behavior_logprobs: list[np.ndarray]  # float32, same
    weights: list[np.ndarray]  # float32, same: the PEAR weights stored by the scorer

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int64)

    @property
    def response_lengths(self) -> np.ndarray:
        return self.lengths - self.prompt_lens

    def subset(self, index) -> "Rows":
        index = [int(i) for i in index]
        return Rows([self.ids[i] for i in index], [self.input_ids[i] for i in index], self.prompt_lens[index],
                    [self.target_logprobs[i] for i in index], [self.behavior_logprobs[i] for i in index],
                    [self.weights[i] for i in index])

    def fingerprint(self) -> str:
        """Hash of the ids and lengths: a resumed run must see the same rows in the same plan."""
        h = hashlib.sha256()
        for i, x, p in zip(self.ids, self.input_ids, self.prompt_lens):
            h.update(f"{i}\0{len(x)}\0{p}\n".encode())
        return h.hexdigest()


def _ragged(table, name: str, dtype) -> list[np.ndarray]:
    return [np.asarray(x, dtype=dtype) for x in table.column(name).to_numpy(zero_copy_only=False)]


def load_rows(scores: str | Path, vocab_size: int, max_len: int | None = None) -> tuple[Rows, dict]:
    """All rows of all shards under `scores`, checked; returns (rows, metadata of the first shard).

    Raises ShardError naming the file (and row) for: another schema version, missing columns,
    logprobs or weights of the wrong length, ids outside the vocabulary, no prompt token, no
    response token, a row longer than the model's context, or shards made with other settings.
    """
    paths = list_shards(scores)
    if not paths:
        raise ShardError(f"{scores}: no shards (*.parquet) to train on")
    first_meta, parts = None, []
    for path in paths:
        meta, table = check_shard(path, vocab_size)
        if first_meta is None:
            first_meta = meta
        for key in SAME_ACROSS_SHARDS:
            if meta.get(key) != first_meta.get(key):
                raise ShardError(f"{path}: {key} {meta.get(key)!r} differs from {paths[0]}'s "
                                 f"{first_meta.get(key)!r}; train on shards made with one setting")
        ids = [str(x) for x in table.column("id").to_pylist()]
        input_ids = _ragged(table, "input_ids", np.int64)
        prompt_lens = np.asarray(table.column("prompt_len").to_pylist(), dtype=np.int64)
        for r, (x, p) in enumerate(zip(input_ids, prompt_lens)):
            # the first scored token needs a hidden state before it: at least one prompt token
            if not 1 <= p < len(x):
                raise ShardError(f"{path}: row {r} (id {ids[r]!r}): prompt_len {p} leaves no prompt or no "
                                 f"response token in {len(x)} tokens")
            if max_len is not None and len(x) > max_len:
                raise ShardError(f"{path}: row {r} (id {ids[r]!r}): {len(x)} tokens, longer than the model's "
                                 f"context of {max_len}")
        parts.append(Rows(ids, input_ids, prompt_lens, _ragged(table, "target_logprobs", np.float32),
                          _ragged(table, "behavior_logprobs", np.float32), _ragged(table, "weights", np.float32)))
    rows = Rows([i for p in parts for i in p.ids], [x for p in parts for x in p.input_ids],
                np.concatenate([p.prompt_lens for p in parts]),
                [x for p in parts for x in p.target_logprobs], [x for p in parts for x in p.behavior_logprobs],
                [x for p in parts for x in p.weights])
    return rows, first_meta


def shard_params(meta: dict) -> WeightParams:
    """The weighting the shards' stored weights were made with."""
    return WeightParams(meta["variant"], meta["gamma"], meta["block_size"], tuple(meta["delta_clip"]),
                        tuple(meta["log_weight_clip"]))


def is_heldout(row_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id: the same rows are held out in every run and arm."""
    h = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


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
    batches, cur, longest = [], [], 0
    for i in order:
        m = max(longest, int(lengths[i]))
        if cur and m * (len(cur) + 1) > token_budget:
            batches.append(np.array(cur))
            cur, m = [], int(lengths[i])
        cur.append(int(i))
        longest = m
    if cur:
        batches.append(np.array(cur))
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


def collate(rows: Rows, index, pad_id: int = 0) -> Batch:
    """The rows `index` as one right-padded micro-batch."""
    index = [int(i) for i in index]
    seqs = [rows.input_ids[i] for i in index]
    plens = [int(rows.prompt_lens[i]) for i in index]
    L = max(len(x) for x in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for j, x in enumerate(seqs):
        input_ids[j, : len(x)] = torch.from_numpy(x)
    r_lens = [len(x) - p for x, p in zip(seqs, plens)]
    b_rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(r_lens))
    resp_pos = torch.cat([torch.arange(n) for n in r_lens])
    cols = torch.tensor(plens)[b_rows] + resp_pos - 1
    cat = lambda col: torch.from_numpy(np.concatenate([getattr(rows, col)[i] for i in index]).astype(np.float32))
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
