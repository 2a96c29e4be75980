"""RL loss math: pure functions over tensors, no model, no config object.

Layout: a batch holds B = P x n sampled responses (n per prompt, grouped by prompt), right-padded
to T response tokens; `response_mask` (B, T) marks the real ones. All logprobs are of the sampled
tokens. Names follow their role:
    logprobs           (B, T)  the policy being trained, with grad
    old_logprobs       (B, T)  the trainer's policy when the batch was sampled (no grad)
    sampling_logprobs  (B, T)  what the inference engine reported while sampling
    ref_logprobs       (B, T)  the starting model (for the optional KL penalty)

The engine and the trainer compute the same policy with different kernels, so `old_logprobs`
and `sampling_logprobs` differ slightly (a lot in bf16); truncated importance sampling (TIS)
reweights each token by min(pi_old / pi_sampler, cap) to correct for it (Yao et al., 2025,
"Your efficient RL framework secretly brings you off-policy RL training").
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("token", "sequence")
ADVANTAGE_SCALES = ("std", "none")


def group_advantages(
    rewards: torch.Tensor,  # (P, n) rewards of n samples for each of P prompts
    scale: str = "std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages (P, n): (r - group mean), divided by the group std when scale='std'.

    The std is the unbiased one (as in GRPO's reference implementations); a group whose rewards
    are all equal gets advantage 0 (nothing to learn from it). scale='none' keeps the plain
    centred reward (Dr. GRPO: dividing by the std up-weights easy and hopeless prompts).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "none" or rewards.shape[-1] < 2:
        return centred.float()
    std = rewards.std(dim=-1, keepdim=True)  # unbiased (n - 1)
    return (centred / (std + eps)).float()


def aggregate(
    values: torch.Tensor,  # (B, T) per-token values
    response_mask: torch.Tensor,  # (B, T) bool
    mode: str,
    normaliser: float | None = None,
) -> torch.Tensor:
    """One scalar from per-token values.

    token:    sum over every response token / number of response tokens (long responses weigh more)
    sequence: mean over each response's tokens, then mean over responses (each response weighs 1)

    `normaliser`: when these B rows are one micro-batch of a larger batch, that batch's
    `aggregation_normaliser`; the micro-batches' aggregates then add up to the whole batch's
    (so gradients accumulated over micro-batches equal the one-shot gradient). None: these rows'.
    """
    mask = response_mask.to(values.dtype)
    if mode == "token":
        total, count = (values * mask).sum(), mask.sum()
    elif mode == "sequence":
        lengths = mask.sum(dim=-1)  # (B,)
        per_seq = (values * mask).sum(dim=-1) / lengths.clamp(min=1.0)  # (B,)
        has_tokens = (lengths > 0).to(values.dtype)
        total, count = (per_seq * has_tokens).sum(), has_tokens.sum()
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if normaliser is None:
        return total / count.clamp(min=1.0)
    return total / max(float(normaliser), 1.0)


def aggregation_normaliser(
    response_mask: torch.Tensor,  # (B, T) bool, the whole batch
    mode: str,
) -> float:
    """What `aggregate` divides the whole batch's sum by: its response tokens (token) or its
    responses with at least one token (sequence)."""
    lengths = response_mask.sum(dim=-1)  # (B,)
    if mode == "token":
        return float(lengths.sum())
    if mode == "sequence":
        return float((lengths > 0).sum())
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def micro_batches(
    lengths,  # (B,) tokens of each sequence (prompt + response)
    token_budget: int,
) -> list:
    """Row indices of length-packed micro-batches: rows sorted by length, cut so that rows x
    longest row <= token_budget (padding stays within a micro-batch), as the scorer's and the SFT
    trainer's batches are. token_budget <= 0: all rows at once, in order (the batch as one
    forward pass). Every row is in exactly one micro-batch; a row longer than the budget goes
    alone (the trainer refuses such a budget up front)."""
    import numpy as np

    from common.batching import length_sorted_batches

    lengths = np.asarray(lengths, dtype=np.int64)
    if token_budget <= 0 or len(lengths) == 0:
        return [np.arange(len(lengths))]
    return [np.array(b) for b in length_sorted_batches(lengths.tolist(), token_budget)]


def masked_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the response tokens (a statistic, independent of the loss aggregation)."""
    return aggregate(values, response_mask, "token")


def tis_weights(
    old_logprobs: torch.Tensor,  # (B, T) trainer
    sampling_logprobs: torch.Tensor,  # (B, T) inference engine
    cap: float,
) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_sampler, cap) per token (B, T), no grad.

    Only the upper side is truncated: a weight below 1 shrinks a token the engine over-sampled,
    a weight above `cap` would let one token dominate the batch (the variance TIS bounds).
    """
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    log_w = (old_logprobs - sampling_logprobs).detach().clamp(max=20.0)  # exp of < 20: no overflow
    return torch.exp(log_w).clamp(max=cap)


def kl_k3(
    logprobs: torch.Tensor,  # (B, T)
    ref_logprobs: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on samples of pi: exp(d) - d - 1 with d = ref - lp.

    Schulman's k3: unbiased, never negative, low variance when the two policies are close.
    """
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(
    logprobs: torch.Tensor,  # (B, T) with grad
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,) one per response
    response_mask: torch.Tensor,  # (B, T) bool
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token",
    token_weights: torch.Tensor | None = None,  # (B, T) e.g. TIS weights; no grad
    normaliser: float | None = None,  # the whole batch's, when these rows are one micro-batch of it
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, to minimise: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)).

    r = pi / pi_old per token. The max keeps the pessimistic side, so a token stops pulling once
    its ratio has moved `clip` past 1 in the direction its advantage favours. `token_weights`
    (TIS) multiply each token's term before aggregation; `normaliser`: see `aggregate`. Returns
    (loss, stats) with stats: ratio_mean, ratio_max, ratio_min, clip_fraction (share of tokens
    whose clipped term won), approx_kl (k3 of pi_old against pi).
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.detach().to(ratio.dtype)[:, None]  # (B, 1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    loss = aggregate(per_token, response_mask, aggregation, normaliser)

    with torch.no_grad():
        mask = response_mask.bool()
        r = ratio.detach()
        big = torch.finfo(r.dtype).max
        stats = {
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": torch.where(mask, r, -big).max() if mask.any() else r.new_tensor(1.0),
            "ratio_min": torch.where(mask, r, big).min() if mask.any() else r.new_tensor(1.0),
            "clip_fraction": masked_mean((clipped > unclipped).to(r.dtype), mask),
            "approx_kl": masked_mean(kl_k3(old_logprobs.detach(), logprobs.detach()), mask),
        }
    return loss, stats


def rl_loss(
    logprobs: torch.Tensor,  # (B, T) with grad
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,)
    response_mask: torch.Tensor,  # (B, T) bool
    clip_low: float,
    clip_high: float,
    aggregation: str,
    token_weights: torch.Tensor | None,  # (B, T) TIS weights, or None
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,  # (B, T); needed when kl_coef > 0
    normaliser: float | None = None,  # the whole batch's, when these rows are one micro-batch of it
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RL stage's loss: the clipped policy loss plus kl_coef x the aggregated k3 KL to the
    reference; (loss, the policy loss's stats). With the whole batch's `normaliser`, the losses of
    its micro-batches add up to the batch's loss (and so do their gradients)."""
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low, clip_high,
                                      aggregation, token_weights, normaliser)
    if kl_coef > 0:
        loss = loss + kl_coef * aggregate(kl_k3(logprobs, ref_logprobs), response_mask, aggregation, normaliser)
    return loss, stats
