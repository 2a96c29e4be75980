"""The scorer's configurations: the PEAR weighting as a group (the flags --variant --gamma
--block-size --delta-clip --log-weight-clip, nested in the config of every stage that weighs: score,
reweight, SFT) and the scoring job's own (`ScoreConfig`, here rather than in scorer/job.py because
every module of the job takes it). How a group becomes flags and YAML fields is common/config.py's.
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


@dataclasses.dataclass
class ScoreConfig:
    """Score every response token of a corpus under the target (and behavior) policy."""

    data: str = field("", "corpus: a Parquet/JSONL/JSON file, a folder or a glob of them, a `datasets` folder "
                          "(save_to_disk), or a hub dataset id org/name[@revision]")
    data_config: str = field("", "hub dataset: the configuration name")
    data_split: str = field("", "hub dataset or DatasetDict folder: the split (hub default: train)")
    out: str = field("runs/score", "output folder for shards, summary.json and rejects/")
    target: str = field("", "target policy: a Hugging Face model folder or hub id org/name[@revision]")
    behavior: str = field("", "behavior policy (folder or hub id) for rows without behavior_logprobs; "
                              "empty or 'none': the corpus column only")
    backend: str = field("auto", "scoring backend: vllm, torch, or auto (torch: the fastest measured, "
                                 "see bench/RESULTS.md)")
    weights: WeightConfig = field(WeightConfig(),
                                  "PEAR weighting: --variant, --gamma, --block-size, --delta-clip, --log-weight-clip")
    max_len: int = field(4096, "longest prompt+response in tokens; longer rows are rejected")
    truncate: bool = field(False, "cut over-long responses to max_len instead of rejecting them")
    append_eos: bool = field(True, "end tokenized responses with the tokenizer's EOS token")
    rows_per_shard: int = field(1024, "rows of one input file per output shard (the unit of resume)")
    executor: str = field("ray", "ray (actor pool, local or RAY_ADDRESS cluster) or local (this process)")
    actors: int = field(0, "scoring actors (each holds its own engines); 0: one per GPU of the cluster, or one "
                           "per node on a cluster without GPUs (a single machine: one)")
    gpus_per_actor: float = field(-1.0, "GPUs per actor; -1: 1 where the cluster has GPUs, else 0")
    cpus_per_actor: float = field(0.5, "logical CPUs per actor (a whole CPU each can starve Ray Data on 2 cores)")
    token_budget: int = field(0, "torch backend: tokens per forward batch; 0: 65536 on GPU, 32768 on CPU")
    torch_attention: str = field("", "torch backend: padded or packed; empty: packed on GPU, padded on CPU")
    torch_compile: str = field("auto", "torch backend: torch.compile the layers: true, false or auto (on GPU)")
    dtype: str = field("", "model dtype; empty: bfloat16 on GPU, float32 on CPU")
    overwrite: bool = field(False, "delete shards made with other settings instead of refusing")

    def weight_params(self) -> WeightParams:
        return self.weights.params()

    def resolved_backend(self) -> str:
        # torch measured faster than vLLM's prompt logprobs on the CPU (tiny model) and is the only
        # backend measured on a GPU; vLLM stays one flag away
        return "torch" if self.backend == "auto" else self.backend

    @property
    def behavior_model(self) -> str | None:
        return None if self.behavior.lower() in ("", "none") else self.behavior
