"""Weighted SFT on scored shards: every response token's NLL times its PEAR weight.

    python -m train.sft --scores runs/score --out runs/sft [--weighting pear|uniform|pear-live]
    torchrun --nproc-per-node 8 -m train.sft --scores runs/score --out runs/sft   # DDP, same result
    torchrun --nproc-per-node 8 -m train.sft ... --fsdp true                      # sharded (FSDP2)
    python -m train.sft --config recipe.yaml --lr 2e-5                            # YAML, flags override

loss = sum_t stopgrad(w_t) * NLL_t / (response tokens in the global batch), with
    uniform    w_t = 1 (plain SFT on the same tokens: the baseline)
    pear       w_t = the weights stored in the shards, or, with --variant, recomputed from the
               stored logprobs by the scorer's weight module (scorer/weights.py)
    pear-live  (not evaluated in the paper) delta uses the current model's logprobs from this
               forward pass instead of the stored target logprobs: the ratio follows the model.

`out` becomes a Hugging Face model folder (weights, config, tokenizer) with `metrics.jsonl` (one
line per optimizer step), `train_summary.json` (the training of the model, over every segment
that trained it) and `history.jsonl` (a line per run, rerun or not); `out/checkpoints/step-N/` are HF folders too,
plus `trainer_state.pt` (the step, which fixes the data position; optimizer; RNG). A rerun with
the same settings resumes from the last checkpoint. Bad input (shards, model) prints one line
naming the file and row, exit 2.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from common.config import ConfigError, Stage, field, setup_logging
from common.lock import locked
from common.models import hash_model_folder, pinned, resolve_model
from common.storage import append_json_line, as_path, run_id, write_json_atomic
from scorer.config import WeightConfig
from scorer.engines import token_logprobs
from scorer.shards import ShardError, list_shards, read_meta, tokenizer_sha256
from scorer.stats import TABLE_COLUMNS, weight_table
from scorer.weights import WeightParams
from train import checkpoint, records
from train.data import Batch, Rows, collated, idle_batch, load_rows, parse_only, plan_epoch, rank_share, \
    rows_where, split_heldout, steps_of, stored_weight_params
from train.loss import cosine_lr, effective_sample_size, token_weights, weighted_nll
from train.tracking import Tracker, check_report_to, open_tracker

log = logging.getLogger("pear.train")
WEIGHTINGS = ("uniform", "pear", "pear-live")



@dataclass
class SFTConfig:
    """Weighted SFT from scored shards."""

    scores: str = field("runs/score", "scoring output folder (shards made by scorer.job)")
    out: str = field("runs/sft", "output: HF model folder, metrics.jsonl, train_summary.json, checkpoints/")
    model: str = field("", "model to train (HF folder); empty: the target model the shards were scored with")
    tokenizer: str = field("", "tokenizer copied into the output; empty: the model folder's")
    weighting: str = field("pear", "pear (stored weights), uniform (plain SFT) or pear-live (current-model delta)")
    uniform_weight: float = field(1.0, "with --weighting uniform: the weight of every token (1: plain SFT; a PEAR "
                                       "run's mean weight: a control with PEAR's average loss scale and no "
                                       "per-token shape)")
    weights: WeightConfig = field(WeightConfig(variant=""), "with --variant, recompute the weights with this PEAR "
                                  "weighting (--gamma, --block-size, --delta-clip, --log-weight-clip); no "
                                  "--variant: the stored weights (pear) or the shards' own settings (pear-live)")
    only: str = field("", "train only on the rows whose pass-through column holds one of these values, "
                          "COLUMN=VALUE[|VALUE...] (style=careful: the embedded world's careful traces); the "
                          "held-out rows are all rows' as without it, so held-out NLL compares across runs; "
                          "empty: every row")
    epochs: int = field(1, "passes over the training rows")
    max_steps: int = field(0, "stop after this many optimizer steps (the schedule spans them); 0: all epochs")
    lr: float = field(1e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = field(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    warmup_ratio: float = field(0.05, "share of the steps spent warming up linearly")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping by global norm; 0: off")
    token_budget: int = field(4096, "padded tokens (rows x longest row) per micro-batch, per forward pass")
    micro_batches: int = field(1, "micro-batches per optimizer step over all ranks (gradient accumulation); "
                                  "each rank computes micro_batches / world_size of them, so the number of "
                                  "ranks does not change the training")
    loss_chunk: int = field(2048, "tokens per chunk of the vocabulary projection (no full logits tensor)")
    heldout_fraction: float = field(0.05, "share of rows held out (by hash of id) for the held-out NLL")
    precision: str = field("auto", "auto (bf16 autocast on GPU, float32 on CPU), bf16 or fp32")
    fsdp: bool = field(False, "with several ranks, shard parameters, gradients and optimizer state (FSDP2) "
                              "instead of replicating them (DDP): for models whose training state does not fit "
                              "one device")
    gradient_checkpointing: bool = field(False, "recompute each decoder layer's activations in backward: "
                                                "less peak memory for more step time (measured in "
                                                "bench/RESULTS.md, GPU: SFT step)")
    lora_rank: int = field(0, "train LoRA adapters of this rank (peft) instead of every weight; 0: full "
                              "fine-tuning. The output folder holds the merged model (adapter/ holds the adapter)")
    lora_alpha: float = field(0.0, "LoRA scaling alpha; 0: twice the rank")
    lora_targets: tuple[str, ...] = field(("all-linear",), "modules that get adapters: names or suffixes "
                                                           "(q_proj,v_proj), or all-linear (every linear layer "
                                                           "but the output head)")
    seed: int = field(0, "seed of the data order and of torch")
    save_every: int = field(50, "checkpoint every N optimizer steps (and at the end); 0: only at the end")
    keep_checkpoints: int = field(2, "checkpoints kept (the newest)")
    overwrite: bool = field(False, "start afresh instead of resuming from checkpoints made with other settings")
    threads: int = field(0, "CPU threads per rank; 0: cores / ranks on this machine")
    progress: bool = field(True, "progress bar (rank 0)")
    report_to: str = field("none", "also send the per-step metrics and the scorer's weight table to none, "
                                   "tensorboard or wandb (train/tracking.py)")

    def weight_params(self) -> WeightParams | None:
        """The weighting to recompute with, or None for the stored weights."""
        return self.weights.params() if self.weights.variant else None


# settings that do not change what a run computes: a resumed run may change them
NOT_TRAJECTORY = ("out", "save_every", "keep_checkpoints", "overwrite", "threads", "progress", "gradient_checkpointing",
                  "report_to")


# ---- the model's side of the loss --------------------------------------------------------------

class ResponseLogprobs(torch.nn.Module):
    """Causal LM -> logprobs of the response tokens only, with a chunked vocabulary projection.

    A module (not a function) so that DDP wraps the call that uses the parameters.
    """

    def __init__(self, lm, chunk: int):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, rows, cols, labels):  # (B, L), (N,), (N,), (N,) -> (N,) float32
        hidden = self.lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, D)
        return token_logprobs(hidden[rows, cols], self.lm.get_output_embeddings().weight, labels, self.chunk)


@dataclass(frozen=True)
class StepStats:
    """A step's sums over its response tokens, all a metrics line needs. Between the micro-batches and
    the ranks they travel as one float64 tensor in field order (`tensor`), summed in place and by one
    all-reduce; `from_tensor` names them again."""

    nll: float  # sum of the per-token NLL
    weighted_nll: float  # sum of w * NLL
    weight: float  # sum of w
    weight_sq: float  # sum of w^2 (for the ESS)
    tokens: float  # response tokens (the trained ones)
    real_tokens: float  # prompt + response tokens, padding excluded

    @staticmethod
    def zeros(device) -> torch.Tensor:  # (6,) float64
        return torch.zeros(len(fields(StepStats)), dtype=torch.float64, device=device)

    @staticmethod
    def tensor(nll: torch.Tensor, w: torch.Tensor, batch: Batch) -> torch.Tensor:  # (N,), (N,) float64 -> (6,)
        """One micro-batch's sums, in field order."""
        return torch.stack([nll.sum(), (w * nll).sum(), w.sum(), (w * w).sum(),
                            nll.new_tensor(batch.num_tokens), nll.new_tensor(batch.real_tokens)])

    @classmethod
    def from_tensor(cls, stats: torch.Tensor) -> "StepStats":
        return cls(*stats.tolist())


def micro_batch_loss(net, batch: Batch, weighting: str, params, global_tokens: int, autocast,
                     uniform_weight: float = 1.0):
    """(loss with grad, the micro-batch's sums as a `StepStats` tensor (6,) float64)."""
    with autocast:
        token_lp = net(batch.input_ids, batch.rows, batch.cols, batch.labels)  # (N,) float32
    w = token_weights(weighting, batch, token_lp, params, uniform_weight)  # (N,)
    loss = weighted_nll(token_lp, w, global_tokens)
    stats = StepStats.tensor(-token_lp.detach().double(), w.detach().double(), batch)
    if batch.idle:
        return loss * 0.0, stats * 0.0
    return loss, stats


def grad_sync(model, sync: bool):
    """Reduce gradients over ranks only on a rank's last micro-batch of a step (DDP and FSDP2 differ)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return nullcontext()


def optimizer_step(model, optimizer, batches: list[Batch], weighting: str, params, global_tokens: int, world: int,
                   max_grad_norm: float, autocast, device, uniform_weight: float = 1.0) -> tuple[StepStats, float]:
    """One optimizer step over this rank's micro-batches; returns (its sums over all ranks, grad norm).

    `model` is the ResponseLogprobs module, DDP-wrapped or FSDP-sharded with several ranks.
    """
    stats = StepStats.zeros(device)
    for j, batch in enumerate(batches):
        with grad_sync(model, j == len(batches) - 1):
            loss, s = micro_batch_loss(model, batch.to(device), weighting, params, global_tokens, autocast,
                                       uniform_weight)
            # DDP averages gradients over ranks; the loss is already normalised by the global
            # token count, so scaling by the world size turns that average into the sum.
            (loss * world).backward()
        stats += s
    params_ = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params_, max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(stats)
    return StepStats.from_tensor(stats), float(grad_norm)


def step_metrics(stats: StepStats, grad_norm: float, step: int, epoch: float, lr: float, seconds: float) -> dict:
    """The metrics line of optimizer step `step` (0-based); `epoch`: epochs done once it is done."""
    n_tok = stats.tokens
    return {"step": step + 1, "epoch": round(epoch, 4), "lr": lr,
            "loss": stats.nll / n_tok, "weighted_loss": stats.weighted_nll / n_tok, "mean_weight": stats.weight / n_tok,
            "ess": effective_sample_size(stats.weight, stats.weight_sq),
            "ess_fraction": effective_sample_size(stats.weight, stats.weight_sq) / n_tok,
            "grad_norm": float(grad_norm), "response_tokens": int(n_tok), "tokens": int(stats.real_tokens),
            "tokens_per_s": round(stats.real_tokens / seconds, 1), "seconds": round(seconds, 4)}


# ---- setup -----------------------------------------------------------------------------------

def init_distributed(cfg: SFTConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group only under torchrun with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank() if world > 1 else 0, world, torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
    return dist.get_rank() if world > 1 else 0, world, torch.device("cpu")


def check_inputs(cfg: SFTConfig):
    """Everything that can fail before training: (model dir, tokenizer, train rows, held-out rows, meta)."""
    from transformers import AutoConfig, AutoTokenizer

    check_report_to(cfg.report_to)
    if cfg.weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
    if cfg.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be 0 (off) or positive, got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.fsdp:
        raise ConfigError("--lora-rank with --fsdp: LoRA's training state is small, use DDP (leave --fsdp false)")
    if cfg.weights.variant and cfg.weighting == "uniform":
        raise ConfigError("--variant recomputes PEAR weights; it does not apply to --weighting uniform")
    if cfg.uniform_weight != 1.0 and cfg.weighting != "uniform":
        raise ConfigError("--uniform-weight applies to --weighting uniform only")
    if not 0.0 < cfg.uniform_weight < float("inf"):
        raise ConfigError(f"--uniform-weight must be a positive number, got {cfg.uniform_weight}")
    try:
        cfg.weight_params()
        only = parse_only(cfg.only) if cfg.only else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.micro_batches < 1 or cfg.token_budget < 1 or cfg.epochs < 1:
        raise ConfigError("micro_batches, token_budget and epochs must be >= 1")
    try:
        shards = list_shards(cfg.scores)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if not shards:
        raise ConfigError(f"{cfg.scores}: no shards (*.parquet) to train on; run the scoring job first")
    meta = read_meta(shards[0])
    # the model the shards were scored against, unless another is named
    model_dir = resolve_model(cfg.model or pinned(meta.get("target_model", {})), "model to train (--model)").path
    model_cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.lora_rank:  # the adapter's targets must name modules: checked on an empty (meta) model
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            with_lora(AutoModelForCausalLM.from_config(model_cfg), cfg, None)
    rows, meta = load_rows(cfg.scores, model_cfg.vocab_size, getattr(model_cfg, "max_position_embeddings", None))
    tok_dir = cfg.tokenizer or model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer in {tok_dir!r} ({e}); set --tokenizer") from None
    if meta.get("tokenizer_sha256") not in (None, tokenizer_sha256(tokenizer)):
        raise ConfigError(f"tokenizer {tok_dir!r} differs from the one {shards[0]} was made with; "
                          "the shards' token ids would mean other tokens")
    if meta.get("target_model", {}).get("sha256") not in (None, hash_model_folder(model_dir)["sha256"]):
        log.warning("training %s, but the shards' target logprobs come from %s: the stored PEAR weights refer "
                    "to that model", model_dir, meta["target_model"].get("path"))
    if len(rows) == 0:
        raise ConfigError(f"{cfg.scores}: the shards hold no rows; every row was rejected "
                          f"(see {Path(cfg.scores) / 'rejects' / 'rejects.parquet'})")
    train_rows, heldout = split_heldout(rows, cfg.heldout_fraction)
    if cfg.only:
        train_rows = rows_where(train_rows, *only)
        log.info("--only %s: %d training rows", cfg.only, len(train_rows))
    if len(train_rows) == 0:
        raise ConfigError(f"no training rows left after holding out {cfg.heldout_fraction:.0%}"
                          + (f" and keeping --only {cfg.only}" if cfg.only else ""))
    return model_dir, tokenizer, train_rows, heldout, meta


def with_lora(lm, cfg: SFTConfig, adapter: Path | None):
    """`lm` with trainable LoRA adapters (peft), fresh or loaded from a checkpoint's `adapter`."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError('--lora-rank needs the `peft` package: pip install -e ".[lora]"') from None
    if adapter is not None:
        return PeftModel.from_pretrained(lm, adapter, is_trainable=True)
    targets = cfg.lora_targets[0] if list(cfg.lora_targets) == ["all-linear"] else list(cfg.lora_targets)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, config)
    except ValueError as e:  # a target that names no module
        raise ConfigError(f"--lora-targets {','.join(cfg.lora_targets)}: {e}") from None


def full_state(net, optimizer, fsdp: bool) -> tuple[dict | None, dict | None]:
    """(model state dict, or None: the module's own; optimizer state dict, or None without an
    optimizer), complete on rank 0.

    Under FSDP every rank must call it: the shards are gathered (to CPU). The FSDP optimizer state
    is keyed by parameter name, so it loads on any number of ranks.
    """
    if not fsdp:
        return None, optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = {k.removeprefix("lm."): v for k, v in get_model_state_dict(net, options=opts).items()}
    return model_sd, get_optimizer_state_dict(net, optimizer, options=opts) if optimizer else None


@torch.no_grad()
def heldout_nll(net, rows: Rows, cfg: SFTConfig, device, rank: int, world: int, autocast) -> float | None:
    """Mean NLL per response token on the held-out rows (plain, unweighted), over all ranks."""
    if len(rows) == 0:
        return None
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    plan = plan_epoch(rows.lengths, cfg.token_budget, 0, 0)
    mine = plan[rank::world]
    idle = [idle_batch()] * (math.ceil(len(plan) / world) - len(mine))  # FSDP: equal forward counts
    for b in itertools.chain(collated(rows, mine), idle):
        b = b.to(device)
        with autocast:
            lp = net(b.input_ids, b.rows, b.cols, b.labels)
        if not b.idle:
            sums += torch.stack([-lp.double().sum(), lp.new_tensor(lp.numel(), dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(sums)
    return float(sums[0] / sums[1])


# ---- the run's steps ---------------------------------------------------------------------------

def schedule(cfg: SFTConfig, lengths) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps of the run, warm-up steps); every epoch has as many micro-batches."""
    steps_per_epoch = len(steps_of(len(plan_epoch(lengths, cfg.token_budget, cfg.seed, 0)), cfg.micro_batches))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps, math.ceil(cfg.warmup_ratio * total_steps)


def build_model(cfg: SFTConfig, model_dir: str, ckpt: Path | None, state: dict | None, device, world: int):
    """(the ResponseLogprobs module, the same DDP-wrapped or FSDP-sharded with several ranks, its AdamW):
    the starting model, or checkpoint `ckpt` with the optimizer state and RNG of its `state`."""
    from transformers import AutoModelForCausalLM

    source = str(ckpt) if state else model_dir
    lm = AutoModelForCausalLM.from_pretrained(model_dir if cfg.lora_rank else source, dtype=torch.float32)
    lm.config.use_cache = False
    if cfg.lora_rank:  # a LoRA checkpoint holds the adapter; the base is the starting model
        lm = with_lora(lm, cfg, ckpt if state else None)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = ResponseLogprobs(lm, cfg.loss_chunk)
    fsdp = cfg.fsdp and world > 1
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # shard on the host, then move the shards: the full model never sits on one device
        for layer in getattr(lm.get_decoder(), "layers", []):
            fully_shard(layer)  # one all-gather per layer: one layer's full weights at a time
        fully_shard(net)
        model = net.to(device)
    elif world > 1:
        # buffers (rotary tables) are constants: no broadcast, which would also need equal forward counts
        model = torch.nn.parallel.DistributedDataParallel(
            net.to(device), device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        model = net.to(device)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    if state:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(net, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return net, model, optimizer


def step_batches(rows: Rows, cfg: SFTConfig, steps_per_epoch: int, start_step: int, rank: int, world: int):
    """From `start_step` on, each optimizer step's (epochs done once it is done, this rank's micro-batches,
    the step's response tokens over all ranks): `micro_batches` micro-batches shared out over the ranks."""
    lengths, resp_lengths = rows.lengths, rows.response_lengths
    plan_epoch_no = -1
    for step in itertools.count(start_step):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != plan_epoch_no:
            plan, plan_epoch_no = plan_epoch(lengths, cfg.token_budget, cfg.seed, epoch), epoch
            steps = steps_of(len(plan), cfg.micro_batches)
            # this rank's micro-batches from here to the epoch's end, read a window at a time
            upcoming = collated(rows, [plan[i] for st in steps[k:] for i in rank_share(st, rank, world)])
        this_step = steps[k]
        # every rank knows the plan, so the global token count needs no communication
        global_tokens = int(sum(resp_lengths[plan[i]].sum() for i in this_step))
        batches = [next(upcoming) for _ in rank_share(this_step, rank, world)]
        # every rank runs as many micro-batches as the busiest (a short step leaves some without
        # one): FSDP gathers weights in each forward, so all ranks must run the same number
        batches += [idle_batch()] * (math.ceil(len(this_step) / world) - len(batches))
        yield epoch + (k + 1) / steps_per_epoch, batches, global_tokens


def bar_postfix(metrics: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics line."""
    return {"loss": f"{metrics['loss']:.3f}", "wloss": f"{metrics['weighted_loss']:.3f}",
            "tok_s": f"{metrics['tokens_per_s']:.0f}"}


def save_checkpoint(cfg: SFTConfig, out: Path, step: int, net, optimizer, tokenizer, made_from: dict, totals: dict,
                    rank: int, world: int) -> None:
    """checkpoints/step-N after optimizer step N: every rank gathers (FSDP), rank 0 writes the model, the
    optimizer, the RNG and the run's `totals` so far, then the ranks go on together."""
    model_sd, optim_sd = full_state(net, optimizer, cfg.fsdp and world > 1)  # every rank: FSDP gathers
    if rank == 0:
        checkpoint.save(out, step, net.lm, tokenizer, {
            "step": step, "made_from": made_from, "optimizer": optim_sd, "torch_rng": torch.get_rng_state(),
            **totals}, cfg.keep_checkpoints, model_sd)
    if world > 1:
        dist.barrier()


def save_model(net, tokenizer, out: Path, lora: bool, model_sd: dict | None) -> None:
    """The trained model as a plain HF folder in `out`, for transformers and vLLM; with LoRA the
    adapter goes to out/adapter and the merged model to `out`."""
    if lora:
        net.lm.save_pretrained(out / "adapter")
        net.lm = net.lm.merge_and_unload()
    net.lm.save_pretrained(out, state_dict=model_sd)
    tokenizer.save_pretrained(out)


def learning_summary(steps: list[dict], nll_start: float | None, nll_end: float | None) -> dict:
    """What the run's metrics lines say it learned: the last step's losses, the last epoch's loss (per
    token), the held-out NLL before and after, the mean weight (per token) and ESS fraction (per step)."""
    last_epoch = [m for m in steps if math.ceil(m["epoch"]) == math.ceil(steps[-1]["epoch"])] if steps else []
    epoch_tokens = sum(m["response_tokens"] for m in last_epoch)
    return {
        "final_loss": steps[-1]["loss"] if steps else None,
        "final_weighted_loss": steps[-1]["weighted_loss"] if steps else None,
        "last_epoch_loss": sum(m["loss"] * m["response_tokens"] for m in last_epoch) / epoch_tokens
        if epoch_tokens else None,
        "heldout_nll_start": nll_start, "heldout_nll": nll_end,
        "mean_weight": sum(m["mean_weight"] * m["response_tokens"] for m in steps)
        / max(1, sum(m["response_tokens"] for m in steps)),
        "mean_ess_fraction": sum(m["ess_fraction"] for m in steps) / max(1, len(steps)),
    }


# ---- the run ---------------------------------------------------------------------------------

def train(cfg: SFTConfig, held: ExitStack | None = None) -> dict:
    """One training run; returns the summary (also written to out/train_summary.json by rank 0).
    `held`: where the output folder's lock is kept (rank 0 holds it for all ranks); None: no lock."""
    t_start, name = time.perf_counter(), run_id()
    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    rank, world, device = init_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    # 1. inputs, all checked before anything is written
    model_dir, tokenizer, rows, heldout, meta = check_inputs(cfg)
    if held is not None and rank == 0:
        held.enter_context(locked(out))  # one run per output folder
    params = cfg.weight_params()
    if cfg.weighting == "pear-live" and params is None:
        params = stored_weight_params(meta)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # 2. the plan: optimizer steps of every epoch
    steps_per_epoch, total_steps, warmup_steps = schedule(cfg, rows.lengths)

    # 3. resume from the last checkpoint made with the same settings
    made_from = {**{k: v for k, v in asdict(cfg).items() if k not in NOT_TRAJECTORY}, "data": rows.fingerprint()}
    ckpt, state = checkpoint.resume(out, made_from, cfg.overwrite)
    if state is None and rank == 0:
        checkpoint.clear(out)
    if world > 1:
        dist.barrier()  # no rank loads while rank 0 clears an old run
    start_step = state["step"] if state else 0
    log.info("%s from %s: %d train rows, %d held out, %d steps of %d micro-batches (%d ranks), %s",
             "resuming at step %d" % start_step if state else "training", str(ckpt) if state else model_dir,
             len(rows), len(heldout), total_steps, cfg.micro_batches, world, cfg.weighting)

    # 4. model and optimizer
    net, model, optimizer = build_model(cfg, model_dir, ckpt, state, device, world)
    nll_start = state["heldout_nll_start"] if state else heldout_nll(net, heldout, cfg, device, rank, world, autocast)

    # 5. outputs on rank 0: the metrics file, the progress bar, the tracker
    bar = records.progress_bar(f"sft {cfg.weighting}", total_steps, start_step, cfg.progress and rank == 0)
    tracker = Tracker()
    if rank == 0:
        metrics_path = records.start_lines(out / "metrics.jsonl", start_step if state else None)
        tracker = open_tracker(cfg.report_to, out, f"sft {cfg.weighting} {out.name}", asdict(cfg), start_step)
        scoring = as_path(cfg.scores) / "summary.json"  # a local folder or an object-storage URI
        if scoring.exists() and not state:
            tracker.table("scorer/weights", TABLE_COLUMNS, weight_table(json.loads(scoring.read_text())))

    # 6. the loop: one optimizer step after another, a checkpoint every `save_every`
    net.train()
    t_loop = time.perf_counter()
    # totals over the whole run, resumed segments included (`seconds`: the wall time of the runs that trained)
    tokens_done, seconds_before = (state["tokens_done"], state["loop_seconds"]) if state else (0, 0.0)
    tokens_before, wall_before = tokens_done, (state.get("seconds", 0.0) if state else 0.0)
    plan = step_batches(rows, cfg, steps_per_epoch, start_step, rank, world)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, batches, global_tokens = next(plan)
        lr = cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats, grad_norm = optimizer_step(model, optimizer, batches, cfg.weighting, params, global_tokens, world,
                                          cfg.max_grad_norm, autocast, device, cfg.uniform_weight)
        dt = time.perf_counter() - t0
        tokens_done += stats.real_tokens
        if rank == 0:
            metrics = step_metrics(stats, grad_norm, step, epoch, lr, dt)
            records.record_step(metrics, metrics_path, tracker, bar, bar_postfix(metrics))
        if step + 1 == total_steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(cfg, out, step + 1, net, optimizer, tokenizer, made_from, {
                "heldout_nll_start": nll_start, "tokens_done": tokens_done,
                "loop_seconds": seconds_before + time.perf_counter() - t_loop,
                "seconds": wall_before + time.perf_counter() - t_start}, rank, world)
    bar.close()
    tracker.close()
    loop_seconds = seconds_before + time.perf_counter() - t_loop

    # 7. held-out NLL, the final HF folder and the summary
    net.eval()
    nll_end = heldout_nll(net, heldout, cfg, device, rank, world, autocast)
    model_sd, _ = full_state(net, None, cfg.fsdp and world > 1)  # every rank: FSDP gathers
    if rank != 0:
        return {}
    save_model(net, tokenizer, out, bool(cfg.lora_rank), model_sd)
    steps = records.read_lines(metrics_path)
    wall_now = time.perf_counter() - t_start
    this_run = {"run": name, "from_step": start_step, "to_step": total_steps, "tokens": tokens_done - tokens_before,
                "loop_seconds": round(loop_seconds - seconds_before, 2), "seconds": round(wall_now, 2)}
    made = made_by(out / "train_summary.json", total_steps, trained=start_step < total_steps, timing={
        "resumed_from_step": start_step if state else None, "loop_seconds": round(loop_seconds, 2),
        "seconds": round(wall_before + wall_now, 2),
        "tokens_per_second": round(tokens_done / loop_seconds, 1) if tokens_done else None})
    summary = {
        "weighting": cfg.weighting,
        "weight_params": params.as_dict() if params else None,
        "stored_weight_params": stored_weight_params(meta).as_dict(),
        # absolute, so that evaluation finds them from any folder (held-out check, world provenance)
        "model": str(Path(model_dir).resolve()), "scores": str(as_path(cfg.scores).resolve()),
        "out": str(out.resolve()),
        "world_size": world, "steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "resumed_from_step": made["resumed_from_step"],
        **learning_summary(steps, nll_start, nll_end),
        "train_rows": len(rows), "heldout_rows": len(heldout), "heldout_ids": heldout.ids,
        # the model's training, every segment that trained it: loop time, and `seconds` of wall time (model
        # loading, held-out NLL and saving included); each invocation's own in history.jsonl
        "loop_seconds": made["loop_seconds"], "seconds": made["seconds"],
        "tokens_per_second": made["tokens_per_second"], "config": asdict(cfg),
    }
    write_json_atomic(summary, out / "train_summary.json")
    append_json_line(this_run, out / "history.jsonl")
    return summary


def made_by(summary_path: Path, steps: int, trained: bool, timing: dict) -> dict:
    """The `timing` fields (times, speed, resume step) of the runs that trained the model. A rerun that
    trains no step (its last checkpoint is the end) keeps those of the summary it finds: the rerun is
    not the run that did the work, and has its own line in history.jsonl."""
    before = json.loads(summary_path.read_text()) if summary_path.exists() and not trained else {}
    if before.get("steps") == steps and all(k in before for k in timing):
        return {k: before[k] for k in timing}
    return timing


def format_summary(s: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.4f}"
    return (f"{s['weighting']}: {s['steps']} steps, final loss {f(s['final_loss'])} (last epoch "
            f"{f(s['last_epoch_loss'])}), held-out NLL {f(s['heldout_nll_start'])} -> {f(s['heldout_nll'])}, "
            f"{s['loop_seconds']}s training; model in {s['out']}")


def run(cfg: SFTConfig) -> dict:
    """`train`, with what it holds released and the process group (torchrun) ended afterwards."""
    try:
        with ExitStack() as held:
            return train(cfg, held)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


STAGE = Stage(SFTConfig, run, lambda s: s and format_summary(s), __doc__, errors=(ShardError,), log="sft.log")


def main(argv=None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
