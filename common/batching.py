"""Token-budget batching: row indices grouped so that a batch's padded (or packed) size stays under a
budget of tokens. Pure functions of the rows' lengths, shared by the scorer, the SFT trainer and
the RL trainer's micro-batches.
"""
from __future__ import annotations


def padded_batches(order, lengths, token_budget: int) -> list[list[int]]:
    """Row indices `order` cut greedily, in that order, into batches whose padded size (rows x longest
    row) stays under the token budget; a row longer than the budget is a batch of its own. The one
    token-budget batching of the scorer and the SFT trainer (`train.data.plan_epoch`)."""
    batches, cur, longest = [], [], 0
    for i in order:
        m = max(longest, int(lengths[i]))
        if cur and m * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur, m = [], int(lengths[i])
        cur.append(int(i))
        longest = m
    if cur:
        batches.append(cur)
    return batches


def length_sorted_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped by length so that (rows x longest row) stays under the token budget."""
    return padded_batches(sorted(range(len(lengths)), key=lambda i: lengths[i]), lengths, token_budget)


def packed_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped in length order so that each group's total length stays under the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, total = [], [], 0
    for i in order:
        if cur and total + lengths[i] > token_budget:
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        batches.append(cur)
    return batches
