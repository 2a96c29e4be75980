"""The PEAR weighting as a configuration group: the flags --variant --gamma --block-size
--delta-clip --log-weight-clip, nested in the config of every stage that weighs (score, reweight,
SFT). How a group becomes flags and YAML fields is common/config.py's.
"""
from __future__ import annotations

import dataclasses

from common.config import field
from scorer.weights import VARIANTS, WeightParams


@dataclasses.dataclass
class WeightConfig:
    """The PEAR weighting's constants as every stage takes them (one group, nested in each config)."""

    variant: str = field(WeightParams.variant, f"PEAR variant: {', '.join(VARIANTS[:-1])} or {VARIANTS[-1]}")
    gamma: float = field(WeightParams.gamma, "discount of the token and block variants")
    block_size: int = field(WeightParams.block_size, "tokens per block (block variant)")
    delta_clip: tuple[float, ...] = field(WeightParams.delta_clip, "clip of the per-token log-ratio, lo,hi")
    log_weight_clip: tuple[float, ...] = field(WeightParams.log_weight_clip, "clip of log G, lo,hi")

    def __post_init__(self):
        if self.variant:  # empty: a stage that keeps the stored weights (SFT)
            self.params()  # a bad constant fails here, naming it

    def params(self):
        """The checked `WeightParams` (ValueError names the bad constant)."""
        return WeightParams(**{**dataclasses.asdict(self), "delta_clip": tuple(self.delta_clip),
                               "log_weight_clip": tuple(self.log_weight_clip)})
