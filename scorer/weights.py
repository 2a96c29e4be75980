"""PEAR token weights from per-token log-ratios: the method's math, and nothing else.

Every function takes tensors and numbers (never a config object) so that the scorer, the trainer
and the tests share one implementation. Layout convention: a batch of responses is stored
left-aligned, `(B, T)`, with `response_mask` true on the first T_i positions of row i.

Definitions (the PEAR paper's; every constant is a parameter with the reported default):
    delta[t]   = clip(lp_target[t] - lp_behavior[t], *delta_clip)
    sequence:  log G[t] = sum_j delta[j]
    token:     log G[t] = (T - t) log(gamma) + sum_{j > t} delta[j]
    block:     log G[t] = (T - e_k) log(gamma) + sum_{m > k} rho_m   (t in block k, ending at e_k)
    none:      log G[t] = 0
    G[t] = exp(clip(log G[t], *log_weight_clip))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported in the functions that use it: the stages' configs (scorer/config.py) take their
# defaults from `WeightParams` and `VARIANTS` without the seconds a torch import costs

VARIANTS = ("sequence", "token", "block", "none")


@dataclass(frozen=True)
class WeightParams:
    """The constants that define a PEAR weighting; recorded next to every weight they produce."""

    variant: str = "token"
    gamma: float = 0.999
    block_size: int = 4
    delta_clip: tuple[float, float] = (-0.08, 0.3)
    log_weight_clip: tuple[float, float] = (-10.0, 5.0)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for name in ("delta_clip", "log_weight_clip"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} needs lo <= hi, got {(lo, hi)}")
        object.__setattr__(self, "delta_clip", tuple(float(x) for x in self.delta_clip))
        object.__setattr__(self, "log_weight_clip", tuple(float(x) for x in self.log_weight_clip))

    @classmethod
    def from_dict(cls, d: dict) -> "WeightParams":
        """From `as_dict()`'s keys (as shard metadata records them); other keys are ignored."""
        return cls(d["variant"], d["gamma"], d["block_size"], tuple(d["delta_clip"]), tuple(d["log_weight_clip"]))

    def as_dict(self) -> dict:
        return {
            "variant": self.variant,
            "gamma": self.gamma,
            "block_size": self.block_size,
            "delta_clip": list(self.delta_clip),
            "log_weight_clip": list(self.log_weight_clip),
        }


def clipped_delta(
    target_logprobs: torch.Tensor,  # (B, T)
    behavior_logprobs: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) bool
    delta_clip: tuple[float, float],
) -> torch.Tensor:
    """Per-token clipped log-ratio, zero outside the response."""
    import torch

    delta = (target_logprobs - behavior_logprobs).clamp(*delta_clip)
    return torch.where(response_mask, delta, torch.zeros_like(delta))


def log_weights_from_delta(
    delta: torch.Tensor,  # (B, T), already clipped, zero outside the response
    response_mask: torch.Tensor,  # (B, T) bool, a prefix of each row
    variant: str,
    gamma: float = WeightParams.gamma,
    block_size: int = WeightParams.block_size,
    log_weight_clip: tuple[float, float] = WeightParams.log_weight_clip,
) -> torch.Tensor:
    """Clipped log G for every response token (zero elsewhere), computed in float64."""
    import torch

    delta = delta.double() * response_mask
    lengths = response_mask.sum(-1, keepdim=True)  # (B, 1) = T_i
    total = delta.sum(-1, keepdim=True)  # (B, 1)
    if variant == "none":
        log_g = torch.zeros_like(delta)
    elif variant == "sequence":
        log_g = total.expand_as(delta).clone()
    elif variant in ("token", "block"):
        B = 1 if variant == "token" else block_size
        cum = delta.cumsum(-1)  # (B, T): sum of delta[0..t]
        pos = torch.arange(delta.shape[-1], device=delta.device).expand_as(delta)  # 0-based t
        # Block k of token t ends at e (1-based) = min(ceil((t+1)/B)*B, T_i); the weight sees only
        # the blocks after it: total - cum[e-1], discounted by the tokens left after the block.
        block_end = torch.minimum((pos // B + 1) * B, lengths).clamp(min=1)  # (B, T), 1-based
        future = total - cum.gather(-1, block_end - 1)
        log_g = (lengths - block_end).double() * math.log(gamma) + future  # int x float would be float32
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    log_g = log_g.clamp(*log_weight_clip)
    return torch.where(response_mask, log_g, torch.zeros_like(log_g))


def pear_log_weights(
    target_logprobs: torch.Tensor,  # (B, T)
    behavior_logprobs: torch.Tensor,  # (B, T)
    response_mask: torch.Tensor,  # (B, T) bool
    params: WeightParams,
) -> torch.Tensor:
    """Clipped log G (B, T) from the two policies' logprobs of the same response tokens."""
    delta = clipped_delta(target_logprobs, behavior_logprobs, response_mask, params.delta_clip)
    return log_weights_from_delta(
        delta, response_mask, params.variant, params.gamma, params.block_size, params.log_weight_clip
    )


def pear_weights(target_logprobs, behavior_logprobs, response_mask, params: WeightParams) -> torch.Tensor:
    """G = exp(clipped log G), zero outside the response; float32 (B, T)."""
    import torch

    log_g = pear_log_weights(target_logprobs, behavior_logprobs, response_mask, params)
    return torch.where(response_mask, log_g.exp(), torch.zeros_like(log_g)).float()


def pad_left_aligned(rows: list, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row sequences -> (values (B, T), mask (B, T)), each row starting at column 0;
    values in `dtype` (default float32)."""
    import numpy as np
    import torch

    dtype = dtype or torch.float32
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    T = int(lengths.max()) if len(rows) else 0
    mask = torch.from_numpy(np.arange(T) < lengths[:, None])  # (B, T)
    values = torch.zeros(len(rows), T, dtype=dtype)
    if lengths.sum():  # one copy of all rows: the mask's true cells, row by row, are the rows in order
        values[mask] = torch.as_tensor(np.concatenate([np.asarray(r) for r in rows if len(r)]), dtype=dtype)
    return values, mask


def ragged_weights(target_rows: list, behavior_rows: list, params: WeightParams) -> tuple[list, list]:
    """Weights and clipped log-weights for ragged per-row logprobs (lists of 1-D arrays).

    Returns two lists of float32 numpy arrays, one entry per row, each as long as its response.
    """
    import torch

    tgt, mask = pad_left_aligned(target_rows, torch.float64)
    beh, _ = pad_left_aligned(behavior_rows, torch.float64)
    log_g = pear_log_weights(tgt, beh, mask, params)
    import numpy as np

    if not target_rows:
        return [], []
    w = log_g.exp()
    ends = np.cumsum(mask.sum(-1).numpy())[:-1]  # each row's values, cut from the mask's true cells in order
    weights = np.split(w.float().numpy()[mask.numpy()], ends)
    logs = np.split(log_g.float().numpy()[mask.numpy()], ends)
    return weights, logs
