"""Loss math for weighted SFT: pure functions over tensors (and the learning-rate schedule).

The logprobs of the response tokens come from the scorer's chunked vocabulary projection,
`token_logprobs` (scorer/engines.py), so that the trainers and the torch scorer compute them one
way: no (tokens, vocab) float32 tensor is ever held in full, and under autograd each chunk's logits
are computed again in backward (checkpointing) instead of kept.
"""
from __future__ import annotations

import math

import torch

# re-exported: pipelines/world.py and bench/gpu_bench.py import it from here
from scorer.engines import token_logprobs as token_logprobs


def weighted_nll(
    token_logprobs: torch.Tensor,  # (N,) logprobs of the response tokens, with grad
    weights: torch.Tensor,  # (N,) PEAR weights (or ones for plain SFT)
    num_tokens: float,
) -> torch.Tensor:
    """sum_t stopgrad(w_t) * NLL_t / num_tokens.

    `num_tokens` is the number of response tokens in the *global* batch (all ranks, all
    accumulation steps), so that summing the per-rank losses gives the single-process loss.
    """
    return -(weights.detach().to(token_logprobs.dtype) * token_logprobs).sum() / max(float(num_tokens), 1.0)


def effective_sample_size(sum_w: float, sum_w2: float) -> float:
    """(sum w)^2 / sum w^2 from the two sums (so ranks can add their sums first); n for equal weights."""
    return float(sum_w) ** 2 / float(sum_w2) if sum_w2 > 0 else 0.0


def flat_pear_weights(
    target_logprobs: torch.Tensor,  # (N,) response tokens of a micro-batch, row after row
    behavior_logprobs: torch.Tensor,  # (N,)
    rows: torch.Tensor,  # (N,) long: row of each token
    resp_pos: torch.Tensor,  # (N,) long: index of each token within its response
    num_rows: int,
    params,  # scorer.weights.WeightParams
) -> torch.Tensor:
    """PEAR weights (N,) for flat response tokens, through the scorer's one weight implementation.

    The weight math works on left-aligned (B, T) responses; the trainer holds the response tokens
    flat, so they are scattered into that layout and gathered back.
    """
    from scorer.weights import pear_weights

    T = int(resp_pos.max()) + 1 if resp_pos.numel() else 0
    target = target_logprobs.new_zeros(num_rows, T, dtype=torch.float64)  # (B, T)
    behavior = torch.zeros_like(target)
    mask = torch.zeros(num_rows, T, dtype=torch.bool, device=target.device)
    target[rows, resp_pos] = target_logprobs.detach().double()
    behavior[rows, resp_pos] = behavior_logprobs.detach().double()
    mask[rows, resp_pos] = True
    return pear_weights(target, behavior, mask, params)[rows, resp_pos]  # (N,) float32


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up to peak, then cosine to min_lr_ratio * peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def token_weights(weighting: str, batch, token_lp: torch.Tensor, params, uniform_weight: float = 1.0) -> torch.Tensor:
    """Weights (N,) of a micro-batch's response tokens (a train.data.Batch) for one weighting.

    `token_lp` (N,) are the current model's logprobs; `params` a WeightParams to recompute with,
    or None for the stored weights; `uniform_weight` the one weight of every token of `uniform`
    (1: plain SFT; a PEAR run's mean weight: the control with PEAR's average step and no shape).
    """
    if weighting == "uniform":
        return torch.full_like(token_lp, uniform_weight)
    if weighting == "pear" and params is None:
        return batch.weights
    # pear with --variant: the stored target logprobs; pear-live: this forward pass's, detached
    target = token_lp.detach() if weighting == "pear-live" else batch.target_logprobs
    return flat_pear_weights(target, batch.behavior_logprobs, batch.rows, batch.resp_pos, batch.num_rows, params)
