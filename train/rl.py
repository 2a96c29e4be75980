"""RL from an SFT checkpoint: group-normalised advantages, PPO-clipped policy loss, vLLM rollouts.

    python -m train.rl --model runs/sft/pear --out runs/rl/pear [--tasks chain_sum,countdown] [--steps 50]
    python -m train.rl --prompts my_prompts.parquet --reward my_pkg.rewards:score   # own data and reward
    python -m train.rl --config recipe.yaml --lr 5e-4                               # YAML, flags override

Each step: P prompts -> n samples each from a vLLM engine in this process (token ids and the
engine's sampling logprobs) -> rewards `score(completion, example)` -> advantages normalised
within each prompt's group -> the trainer's logprobs of the sampled tokens -> clipped policy loss,
each token weighted by the truncated importance ratio min(pi_trainer / pi_engine, tis_cap) that
corrects the engine/trainer mismatch, plus an optional KL to the starting model -> one optimizer
step per mini-batch -> the new weights go into the running engine. The math is `train/rl_math.py`.

Memory: every pass over a batch (the no-grad logprobs of the trainer and of the reference, the
forward and backward of an optimizer step) runs in length-packed micro-batches of at most
`--micro-batch-tokens` padded tokens; an optimizer step accumulates the gradients of its
micro-batches, each loss normalised by the whole (mini-)batch, so it is the one-shot step.

`out` becomes a HF model folder with `metrics.jsonl` (one line per step), `rl_summary.json`,
`rl_prompts.jsonl` (the prompt pool, so evaluation can prove it holds other prompts),
`reward_errors.jsonl` (rows whose reward raised; they count as 0) and `checkpoints/step-N/` (HF
folder + `trainer_state.pt`: optimizer, step, RNG). A rerun with the same settings resumes from
the last checkpoint. Bad input prints one line, exit code 2.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, Stage, field, setup_logging
from common.lock import locked
from common.models import model_record, resolve_model
from common.storage import append_json_line, write_json_atomic
from scorer.engines import token_logprobs
from train import checkpoint, records
from train.rewards import load_reward, safe_score
from train.rl_math import (ADVANTAGE_SCALES, AGGREGATIONS, aggregation_normaliser, group_advantages, kl_k3,
                           masked_mean, micro_batches, rl_loss, tis_weights)
from train.rollout import PromptConfig, RolloutEngine, Sample, prompt_token_ids, resolve_aliases
from train.tracking import Tracker, check_report_to, open_tracker

log = logging.getLogger("pear.rl")



@dataclass
class RLConfig:
    """RL (GRPO-style) from an SFT checkpoint, with rollouts by an in-process vLLM engine."""

    model: str = field("runs/sft/pear", "starting model (HF folder); also the reference of the KL term")
    out: str = field("runs/rl/pear", "output: HF model folder, metrics.jsonl, rl_summary.json, checkpoints/")
    prompt_set: PromptConfig = field(PromptConfig(), "the prompt pool: --tasks, --task-kwargs, --num-prompts, "
                                                     "--prompt-seed, or --prompts (a file or hub dataset)")
    reward: str = field("default", "default (0/1: reasoning-gym checker at full credit, else math-verify), "
                                   "reasoning_gym, reasoning_gym_partial (partial credit), math, "
                                   "or 'module:function' / 'file.py:function'")
    pass_threshold: float = field(1.0, "a sample passes when its reward is at least this")
    reward_timeout: float = field(30.0, "seconds one reward call may take before it counts as failed (0: no limit)")
    max_reward_failures: float = field(0.5, "stop the run when more than this share of a step's rewards fail")
    steps: int = field(60, "RL steps (each: one batch of rollouts, `mini_batches` optimizer steps)")
    prompts_per_step: int = field(16, "prompts per step")
    samples_per_prompt: int = field(8, "samples per prompt (the group of the advantage)")
    temperature: float = field(1.0, "sampling temperature; the loss is on the untempered policy, so 1.0 "
                                    "keeps the rollouts on-policy")
    top_p: float = field(1.0, "nucleus sampling")
    max_new_tokens: int = field(64, "longest response (the default is the embedded world's)")
    lr: float = field(1e-6, "learning rate (AdamW, constant); `make rl` gives a model of the embedded world the "
                            "tiny model's own (recipes/embedded-rl.yaml)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping by global norm; 0: off")
    mini_batches: int = field(1, "optimizer steps per batch of rollouts (>1: later ones are off-policy and clipped)")
    clip_low: float = field(0.2, "policy ratio clipped below at 1 - clip_low")
    clip_high: float = field(0.2, "policy ratio clipped above at 1 + clip_high (0.28: DAPO's clip-higher)")
    aggregation: str = field("token", "token (mean over all response tokens) or sequence (mean per response, "
                                      "then over responses)")
    advantage_scale: str = field("std", "std (GRPO) or none (centred rewards only, Dr. GRPO)")
    kl_coef: float = field(0.0, "weight of the k3 KL penalty to the starting model; 0: none")
    track_kl: bool = field(True, "log the KL to the starting model even when kl_coef is 0 (one more forward)")
    tis_cap: float = field(2.0, "cap of the truncated importance weight pi_trainer / pi_engine; 0: no correction")
    loss_chunk: int = field(4096, "tokens per chunk of the vocabulary projection")
    micro_batch_tokens: int = field(4096, "padded tokens (rows x longest row) per forward pass of the trainer: "
                                          "each pass over a step's batch runs in length-packed micro-batches "
                                          "of at most this many, an optimizer step accumulating their gradients "
                                          "(the same step as the whole batch at once); bounds the trainer's "
                                          "memory. At least the longest sequence (prompt + max_new_tokens); "
                                          "0: the whole mini-batch in one pass")
    gradient_checkpointing: bool = field(False, "recompute each decoder layer's activations in backward: "
                                                "less memory per micro-batch token, one more forward pass")
    seed: int = field(0, "seed of torch, of the prompt order and of the engine's sampler")
    save_every: int = field(10, "checkpoint every N steps (and at the end); 0: only at the end")
    keep_checkpoints: int = field(2, "checkpoints kept (the newest)")
    snapshot_steps: str = field("", "comma-separated steps after which the model is also saved, weights only, "
                                    "to OUT/snapshots/step-NNNNNN (kept, for evaluating RL's progress)")
    overwrite: bool = field(False, "start afresh instead of resuming from checkpoints made with other settings")
    threads: int = field(0, "CPU threads; 0: all cores")
    gpu_memory_utilization: float = field(0.3, "share of the GPU the engine may take (the trainer shares it)")
    cpu_kv_cache_gib: int = field(1, "on the CPU: GiB of the engine's KV cache (VLLM_CPU_KVCACHE_SPACE); 1 holds "
                                     "about 23,000 tokens of a 135M SmolLM2-shaped model in float32 (46 KB a "
                                     "token), a batch that does not fit is generated in turns")
    progress: bool = field(True, "progress bar")
    report_to: str = field("none", "also send the per-step metrics to none, tensorboard or wandb (train/tracking.py)")
    # other trainers' names (TRL's GRPOConfig), on the command line and in YAML; each is moved onto its field
    num_generations: int | None = field(None, "TRL's name for --samples-per-prompt")
    beta: float | None = field(None, "TRL's name for --kl-coef")
    epsilon: float | None = field(None, "TRL's name for --clip-low; as in TRL it also sets --clip-high when that "
                                        "is not given")
    epsilon_high: float | None = field(None, "TRL's name for --clip-high")
    max_completion_length: int | None = field(None, "TRL's name for --max-new-tokens")
    learning_rate: float | None = field(None, "TRL's name for --lr")

    # TRL's names for fields: given, they are moved onto the fields (and a recipe's value for the
    # field gives way to them, common/config.py `beneath`)
    ALIASES: ClassVar[dict[str, str]] = {
        "num_generations": "samples_per_prompt", "beta": "kl_coef", "epsilon": "clip_low", "epsilon_high": "clip_high",
        "max_completion_length": "max_new_tokens", "learning_rate": "lr"}

    def __post_init__(self):
        if self.epsilon is not None and self.epsilon_high is None and self.clip_high == RLConfig.clip_high:
            self.epsilon_high = self.epsilon  # TRL: epsilon_high defaults to epsilon
        resolve_aliases(self, self.ALIASES)


ALIASES = RLConfig.ALIASES


# settings a resumed run may change: they do not alter what a step computes
# (the micro-batching neither: a run killed for memory resumes with a smaller budget)
NOT_TRAJECTORY = ("out", "steps", "save_every", "keep_checkpoints", "snapshot_steps", "overwrite", "threads",
                  "progress", "reward_timeout", "max_reward_failures", "report_to", "micro_batch_tokens",
                  "gradient_checkpointing", *ALIASES)  # always None: moved onto their fields


# ---- pieces of a step ----------------------------------------------------------------------------

def keep_malloc_threshold() -> None:
    """Fix glibc's mmap threshold at its default of 128 KiB (nothing where libc is not glibc).

    glibc raises the threshold, up to 32 MiB, each time a block above it is freed; the activations
    of the next micro-batches (1-32 MiB each) then come from the heap, and freed, stay there in
    pieces: on the CPU the step's peak grew with every micro-batch (bench/bench_rl_memory.py).
    Blocks over a fixed threshold are mapped and unmapped alone, so a micro-batch's leave with it.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def step_prompts(num_prompts: int, per_step: int, seed: int, step: int) -> list[int]:
    """Pool indices of a step's prompts: a fresh seeded permutation each pass, a function of the step alone."""
    steps_per_pass = max(1, num_prompts // per_step)
    epoch, k = divmod(step, steps_per_pass)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    return [int(i) for i in order[k * per_step: (k + 1) * per_step]]


def pack(prompts: list[list[int]], responses: list[list[int]]):
    """Right-padded (B, L) ids and the masks that place each response.

    Returns input_ids (B, L), label_mask (B, L - 1): hidden state t predicts a response token at
    t + 1, and response_mask (B, T): the first len(response) entries of each row.
    """
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    input_ids = torch.zeros(B, L, dtype=torch.long)
    label_mask = torch.zeros(B, L - 1, dtype=torch.bool)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
        label_mask[i, len(p) - 1: len(p) + len(r) - 1] = True
        response_mask[i, : len(r)] = True
    return input_ids, label_mask, response_mask


def response_logprobs(lm, input_ids, label_mask, response_mask, chunk: int) -> torch.Tensor:
    """The model's logprobs of the response tokens, (B, T) laid out like `response_mask` (0 elsewhere).

    Right padding and a causal model: no attention mask needed. Both masks are read row-major, so
    the flat response tokens land in order.
    """
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, D)
    flat = token_logprobs(hidden[:, :-1][label_mask], lm.get_output_embeddings().weight,
                          input_ids[:, 1:][label_mask], chunk)  # (N,)
    return torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(response_mask, flat)


@dataclass
class RolloutBatch:
    """A step's B = P x n sampled responses as the trainer sees them (tensors on its device)."""

    input_ids: torch.Tensor  # (B, L) right-padded prompt + response
    label_mask: torch.Tensor  # (B, L - 1) hidden state t predicts a response token at t + 1
    response_mask: torch.Tensor  # (B, T) the first len(response) entries of each row
    sampling_logprobs: torch.Tensor  # (B, T) the engine's, 0 past each response
    lengths: np.ndarray  # (B,) prompt + response tokens of each row

    def rows(self, index: torch.Tensor):
        """(input_ids, label_mask, response_mask) of the rows `index`, cut to their own longest row:
        a micro-batch is padded only to its longest sequence."""
        L = int(self.lengths[index.cpu().numpy()].max())
        T = max(1, int(self.response_mask[index].sum(-1).max()))
        return self.input_ids[index, :L], self.label_mask[index, : L - 1], self.response_mask[index, :T]


def rollout_batch(prompts: list[list[int]], samples: list[Sample], device) -> RolloutBatch:
    """The trainer's tensors of B sampled responses (`prompts[i]` is sample i's prompt)."""
    input_ids, label_mask, response_mask = pack(prompts, [s.token_ids for s in samples])
    sampling_lp = torch.zeros(response_mask.shape, dtype=torch.float32)  # (B, T)
    for i, s in enumerate(samples):
        sampling_lp[i, : len(s.logprobs)] = torch.from_numpy(s.logprobs)
    lengths = np.array([len(p) + len(s.token_ids) for p, s in zip(prompts, samples)], dtype=np.int64)
    return RolloutBatch(input_ids.to(device), label_mask.to(device), response_mask.to(device), sampling_lp.to(device),
                        lengths)


def batch_logprobs(model, batch: RolloutBatch, token_budget: int, chunk: int, autocast) -> torch.Tensor:
    """The model's logprobs of every response token (B, T), without grad, micro-batch by micro-batch."""
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.response_mask.device)  # (B, T)
    with torch.no_grad(), autocast:
        for rows in micro_batches(batch.lengths, token_budget):
            index = torch.as_tensor(rows, device=out.device)
            ids, label_mask, response_mask = batch.rows(index)
            out[index, : response_mask.shape[1]] = response_logprobs(model, ids, label_mask, response_mask, chunk)
    return out


def accumulated_step(lm, optimizer, batch: RolloutBatch, rows: torch.Tensor, old_lp, advantages, tis, ref_lp,
                     cfg: RLConfig, autocast) -> tuple[torch.Tensor, dict, float]:
    """One optimizer step on the rows `rows` (a mini-batch) of `batch`: the gradients of its
    length-packed micro-batches accumulated, each loss normalised by the whole mini-batch, so the
    step is the one-shot step. Returns (loss, stats, grad norm): the loss and its statistics on the
    whole mini-batch, as `rl_loss` gives them, with the policy before the step."""
    norm = aggregation_normaliser(batch.response_mask[rows], cfg.aggregation)
    lp = torch.zeros(batch.response_mask[rows].shape, dtype=torch.float32, device=rows.device)  # (b, T) no grad
    pick = lambda x, index, T: None if x is None else x[index, :T]  # noqa: E731
    for part in micro_batches(batch.lengths[rows.cpu().numpy()], cfg.micro_batch_tokens):
        part = torch.as_tensor(part, device=rows.device)
        index = rows[part]
        ids, label_mask, response_mask = batch.rows(index)
        if not response_mask.any():  # no response token: no gradient to add
            continue
        T = response_mask.shape[1]
        with autocast:
            part_lp = response_logprobs(lm, ids, label_mask, response_mask, cfg.loss_chunk)  # (m, T)
        loss, _ = rl_loss(part_lp, old_lp[index, :T], advantages[index], response_mask, cfg.clip_low, cfg.clip_high,
                          cfg.aggregation, pick(tis, index, T), cfg.kl_coef, pick(ref_lp, index, T), norm)
        loss.backward()
        lp[part, :T] = part_lp.detach()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.max_grad_norm or float("inf")))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss, stats = rl_loss(lp, old_lp[rows], advantages[rows], batch.response_mask[rows], cfg.clip_low,
                              cfg.clip_high, cfg.aggregation, pick(tis, rows, None), cfg.kl_coef,
                              pick(ref_lp, rows, None))
    return loss, stats, grad_norm


def update_policy(lm, ref, optimizer, batch: RolloutBatch, advantages, cfg: RLConfig, autocast,
                  after_step=lambda: None):
    """The trainer's part of a step: the no-grad logprobs of the policy (pi_old) and of the reference
    (None without one), the TIS weights, then one accumulated optimizer step per mini-batch,
    `after_step()` after each (the engine takes the new weights). Returns (old_lp, ref_lp, tis,
    losses: the mini-batches' loss statistics combined, grad_norms)."""
    old_lp = batch_logprobs(lm, batch, cfg.micro_batch_tokens, cfg.loss_chunk, autocast)  # (B, T)
    ref_lp = batch_logprobs(ref, batch, cfg.micro_batch_tokens, cfg.loss_chunk, autocast) if ref is not None else None
    tis = tis_weights(old_lp, batch.sampling_logprobs, cfg.tis_cap) if cfg.tis_cap > 0 else None  # (B, T)
    lm.train()
    losses: dict[str, float] = {}
    grad_norms = []
    for mb in torch.arange(len(batch.lengths), device=old_lp.device).chunk(cfg.mini_batches):
        loss, stats, grad_norm = accumulated_step(lm, optimizer, batch, mb, old_lp, advantages, tis, ref_lp, cfg,
                                                  autocast)
        grad_norms.append(grad_norm)
        after_step()
        for k, v in {"loss": loss, **stats}.items():
            losses[k] = combine_stat(k, losses.get(k), float(v), cfg.mini_batches)
    lm.eval()
    return old_lp, ref_lp, tis, losses, grad_norms


def step_metrics(rewards, response_mask, old_lp, sampling_lp, ref_lp, tis, tis_cap: float, pass_threshold: float,
                 finished: list[bool], losses: dict, grad_norms: list[float], reward_errors: int) -> dict:
    """A step's metrics from its tensors: rewards (P, n), the (B, T) logprobs and TIS weights (None
    when off), the samples' EOS flags, the mini-batches' combined loss statistics and grad norms."""
    lengths = response_mask.sum(-1).float()
    resp_tokens = int(lengths.sum())
    passed = (rewards >= pass_threshold).float()  # (P, n)
    tis_stats = {"tis_mean": None, "tis_capped_fraction": None}
    if tis is not None:
        tis_stats = {"tis_mean": float(masked_mean(tis, response_mask)),
                     "tis_capped_fraction": float(masked_mean((tis >= tis_cap).float(), response_mask))}
    gap = (old_lp - sampling_lp).abs()
    return {
        "mean_reward": float(rewards.mean()), "reward_std": float(rewards.std()),
        "pass_rate": float(passed.mean()), "prompt_pass_rate": float(passed.max(-1).values.mean()),
        "groups_with_signal": float((rewards.std(-1) > 0).float().mean()),
        "response_length": float(lengths.mean()), "response_length_max": int(lengths.max()),
        "truncated_fraction": float(np.mean([not f for f in finished])),
        **{k: round(v, 6) for k, v in losses.items()},
        "kl_ref": float(masked_mean(kl_k3(old_lp, ref_lp), response_mask)) if ref_lp is not None else None,
        **tis_stats,
        "logprob_gap_mean": float(masked_mean(gap, response_mask)),
        "logprob_gap_max": float(gap[response_mask].max()) if resp_tokens else 0.0,
        "grad_norm": float(np.mean(grad_norms)), "reward_errors": reward_errors, "response_tokens": resp_tokens,
    }


def combine_stat(name: str, so_far: float | None, value: float, parts: int) -> float:
    """A step's statistic from its mini-batches': the largest `*_max`, the smallest `*_min`, else the mean."""
    if so_far is None:
        return value if name.endswith(("_max", "_min")) else value / parts
    if name.endswith("_max"):
        return max(so_far, value)
    if name.endswith("_min"):
        return min(so_far, value)
    return so_far + value / parts


def score_groups(reward_fn, texts: list[list[str]], examples: list[dict], timeout: float = 0.0,
                 max_failures: float = 1.0, errors_path: Path | None = None, step: int = 0):
    """Rewards (P, n) and the rows whose reward failed (each counted as 0). ConfigError as soon as
    more than `max_failures` of the P x n calls failed: a broken reward must not train a model; the
    failed rows so far are appended to `errors_path` first (with `step`), so the stop is explained."""
    rewards, errors = [], []
    limit = max_failures * sum(len(g) for g in texts)
    for i, (group, ex) in enumerate(zip(texts, examples)):
        row = []
        for j, text in enumerate(group):
            value, err = safe_score(reward_fn, text, ex, timeout)
            row.append(value)
            if err:
                errors.append({"prompt": ex["prompt"], "answer": ex["answer"], "sample": j, "completion": text,
                               "error": err, "group": i})
                if len(errors) > limit:
                    if errors_path is not None:
                        record_errors(errors, step, errors_path)
                    raise ConfigError(f"more than {max_failures:.0%} of a step's rewards failed ({len(errors)} so far; "
                                      f"first: {errors[0]['error']}; rows in {errors_path}); fix the reward (--reward) "
                                      "or raise --max-reward-failures")
        rewards.append(row)
    return torch.tensor(rewards, dtype=torch.float32), errors


# ---- setup -------------------------------------------------------------------------------------

def check_inputs(cfg: RLConfig):
    """Everything that can fail before training: (tokenizer, examples, reward function)."""
    from transformers import AutoTokenizer

    check_report_to(cfg.report_to)
    if cfg.aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {cfg.aggregation!r}")
    if cfg.advantage_scale not in ADVANTAGE_SCALES:
        raise ConfigError(f"advantage_scale must be one of {ADVANTAGE_SCALES}, got {cfg.advantage_scale!r}")
    if min(cfg.steps, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.mini_batches) < 1:
        raise ConfigError("steps, prompts_per_step, samples_per_prompt, max_new_tokens, mini_batches must be >= 1")
    if (cfg.prompts_per_step * cfg.samples_per_prompt) % cfg.mini_batches:
        raise ConfigError("mini_batches must divide prompts_per_step * samples_per_prompt")
    if cfg.micro_batch_tokens < 0:
        raise ConfigError(f"micro_batch_tokens must be >= 0 (0: the whole batch in one pass), "
                          f"got {cfg.micro_batch_tokens}")
    if cfg.cpu_kv_cache_gib < 1 or not 0 < cfg.gpu_memory_utilization <= 1:
        raise ConfigError(f"cpu_kv_cache_gib must be >= 1 (GiB) and gpu_memory_utilization in (0, 1], got "
                          f"{cfg.cpu_kv_cache_gib} and {cfg.gpu_memory_utilization}")
    snapshot_steps(cfg)  # checked here, before anything loads
    if cfg.temperature != 1.0:
        log.warning("temperature %.2f: the engine samples the tempered policy, the loss and the TIS ratio use "
                    "the untempered one, so the rollouts are slightly off-policy", cfg.temperature)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    try:
        examples = cfg.prompt_set.examples()
        reward_fn = load_reward(cfg.reward)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(str(e)) from None
    if len(examples) < cfg.prompts_per_step:
        raise ConfigError(f"{len(examples)} prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    for ex in examples:
        ex["prompt_ids"] = prompt_token_ids(tokenizer, ex)  # its `messages` when it has them
    return tokenizer, examples, reward_fn


def snapshot_steps(cfg: RLConfig) -> set[int]:
    """The steps of --snapshot-steps, each in 1..steps."""
    try:
        steps = {int(x) for x in cfg.snapshot_steps.split(",") if x.strip()}
    except ValueError:
        raise ConfigError(f"snapshot_steps: comma-separated step numbers, got {cfg.snapshot_steps!r}") from None
    if any(not 1 <= x <= cfg.steps for x in steps):
        raise ConfigError(f"snapshot_steps {cfg.snapshot_steps!r}: every step must be in 1..steps={cfg.steps}")
    return steps


# ---- the run's steps ---------------------------------------------------------------------------

def trainer_device(cfg: RLConfig) -> torch.device:
    """The GPU where there is one; on the CPU, `threads` threads and a fixed malloc threshold."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))
        keep_malloc_threshold()
    return device


def longest_sequence(cfg: RLConfig, examples: list[dict]) -> int:
    """The longest prompt + max_new_tokens: the engine's max_model_len. ConfigError when it is over
    the model's positions or the micro-batch budget (a row that fits no micro-batch)."""
    from transformers import AutoConfig

    max_model_len = max(len(ex["prompt_ids"]) for ex in examples) + cfg.max_new_tokens
    limit = getattr(AutoConfig.from_pretrained(cfg.model), "max_position_embeddings", None)
    if limit and max_model_len > limit:
        raise ConfigError(f"longest prompt + max_new_tokens = {max_model_len} tokens, over the model's {limit}")
    if 0 < cfg.micro_batch_tokens < max_model_len:
        raise ConfigError(f"micro_batch_tokens {cfg.micro_batch_tokens} is less than the longest sequence (longest "
                          f"prompt + max_new_tokens = {max_model_len} tokens); give at least that, or 0 for the "
                          "whole batch in one pass")
    return max_model_len


def resume_state(cfg: RLConfig, out: Path, examples: list[dict], model_ref) -> tuple[dict, Path | None, dict | None]:
    """(made_from, the checkpoint to resume from, its state): the last checkpoint made with the same
    settings; without one (made_from, None, None), the old checkpoints and snapshots cleared."""
    made_from = {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAJECTORY}
    # what the run learns from, by content: the prompt pool and the starting model's weights
    made_from["inputs"] = hashlib.sha256(json.dumps([[ex["prompt"], str(ex.get("answer"))] for ex in examples]).encode()
                                         + model_record(model_ref)["sha256"].encode()).hexdigest()
    ckpt, state = checkpoint.resume(out, made_from, cfg.overwrite)
    if state is None:
        checkpoint.clear(out)
    return made_from, ckpt, state


def build_models(cfg: RLConfig, source: str, state: dict | None, device, max_model_len: int, start_step: int):
    """(policy, reference or None, AdamW, engine): the policy and the engine from `source` (the
    starting model or the checkpoint), with the optimizer state and RNG of a resumed `state`. The
    engine's seed moves with the start step so that a resumed run does not replay the first samples."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.kl_coef > 0 or cfg.track_kl:  # the reference is always the starting model
        ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device).eval()
        ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine = RolloutEngine(source, max_model_len, seed=cfg.seed + start_step,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, cpu_kv_cache_gib=cfg.cpu_kv_cache_gib)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return lm, ref, optimizer, engine


def start_outputs(out: Path, examples: list[dict], resumed_step: int | None) -> tuple[Path, Path]:
    """(metrics.jsonl, reward_errors.jsonl), holding the lines of the steps a resumed checkpoint
    contains (none afresh), and rl_prompts.jsonl: the prompt pool."""
    metrics_path = records.start_lines(out / "metrics.jsonl", resumed_step)
    errors_path = records.start_lines(out / "reward_errors.jsonl", resumed_step)
    with open(out / "rl_prompts.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex["answer"], "task": ex.get("task")}) + "\n")
    return metrics_path, errors_path


def rl_step(cfg: RLConfig, step: int, examples: list[dict], tokenizer, reward_fn, engine, lm, ref, optimizer,
            device, autocast, errors_path: Path) -> tuple[dict, list[dict]]:
    """Step `step` (from 0): rollouts, rewards, the policy update. Returns (its metrics line, the
    rows whose reward raised)."""
    t0 = time.perf_counter()
    batch = [examples[i] for i in step_prompts(len(examples), cfg.prompts_per_step, cfg.seed, step)]
    n = cfg.samples_per_prompt

    # rollouts: n samples per prompt, token ids and the engine's logprobs
    groups = engine.generate([ex["prompt_ids"] for ex in batch], n, cfg.temperature, cfg.max_new_tokens, cfg.top_p)
    t_gen = time.perf_counter() - t0
    samples = [s for g in groups for s in g]  # (B = P * n), grouped by prompt
    texts = [[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in g] for g in groups]

    # rewards and group-normalised advantages
    rewards, errors = score_groups(reward_fn, texts, batch, cfg.reward_timeout, cfg.max_reward_failures,
                                   errors_path, step + 1)
    advantages = group_advantages(rewards, cfg.advantage_scale).reshape(-1).to(device)  # (B,)

    # the trainer's view of the same tokens (pi_old, the reference, TIS weights), then one optimizer
    # step per mini-batch, each accumulated over micro-batches; after each, the engine gets the new weights
    rb = rollout_batch([ex["prompt_ids"] for ex in batch for _ in range(n)], samples, device)
    old_lp, ref_lp, tis, losses, grad_norms = update_policy(lm, ref, optimizer, rb, advantages, cfg, autocast,
                                                            lambda: engine.push_weights(lm))
    dt = time.perf_counter() - t0
    metrics = {"step": step + 1,
               **step_metrics(rewards, rb.response_mask, old_lp, rb.sampling_logprobs, ref_lp, tis, cfg.tis_cap,
                              cfg.pass_threshold, [s.finished for s in samples], losses, grad_norms, len(errors)),
               "tokens_per_s": round(int(rb.response_mask.sum()) / dt, 1), "gen_seconds": round(t_gen, 3),
               "seconds": round(dt, 3)}
    return metrics, errors


def record_errors(errors: list[dict], step: int, errors_path: Path) -> None:
    """The rows of step `step` (from 1) whose reward raised: to reward_errors.jsonl, each with its step."""
    for e in errors:
        append_json_line({"step": step, **e}, errors_path)


def record_step(metrics: dict, errors: list[dict], metrics_path: Path, errors_path: Path, tracker: Tracker,
                bar) -> None:
    """A step's rows whose reward raised (to reward_errors.jsonl, with a warning) and its metrics line
    (to metrics.jsonl, the tracker, the progress bar)."""
    step = metrics["step"]
    if errors:
        log.warning("step %d: %d rewards raised and count as 0 (first: %s); rows in %s", step, len(errors),
                    errors[0]["error"], errors_path)
        record_errors(errors, step, errors_path)
    records.record_step(metrics, metrics_path, tracker, bar, bar_postfix(metrics))


def bar_postfix(metrics: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics line."""
    return {"reward": f"{metrics['mean_reward']:.3f}", "pass_rate": f"{metrics['pass_rate']:.2f}",
            "len": f"{metrics['response_length']:.0f}", "tis": f"{metrics['tis_mean'] or 1:.3f}"}


def save_step(cfg: RLConfig, out: Path, step: int, lm, optimizer, tokenizer, made_from: dict,
              snapshots: set[int]) -> None:
    """What is due after step `step` (from 1): a snapshot (weights only) where asked; a checkpoint
    (HF folder, optimizer, step, RNG) every `save_every` steps and at the end."""
    if step in snapshots:
        checkpoint.snapshot(out, step, lm, tokenizer)
    if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
        checkpoint.save(out, step, lm, tokenizer, {"step": step, "made_from": made_from,
                                                   "optimizer": optimizer.state_dict(),
                                                   "torch_rng": torch.get_rng_state()}, cfg.keep_checkpoints)


def learning_summary(steps: list[dict]) -> dict:
    """What the run's metrics lines say it learned: the mean reward and pass rate over the first and
    the last few steps (a quarter of the run, 1 to 5 steps), and the rewards that raised."""
    window = max(1, min(5, len(steps) // 4))
    mean_of = lambda rows, key: float(np.mean([m[key] for m in rows])) if rows else None  # noqa: E731
    return {
        "mean_reward_first": mean_of(steps[:window], "mean_reward"),
        "mean_reward_last": mean_of(steps[-window:], "mean_reward"),
        "pass_rate_first": mean_of(steps[:window], "pass_rate"),
        "pass_rate_last": mean_of(steps[-window:], "pass_rate"),
        "window_steps": window, "reward_errors": sum(m["reward_errors"] for m in steps),
    }


# ---- the run -----------------------------------------------------------------------------------

def train(cfg: RLConfig, held: ExitStack | None = None) -> dict:
    """One RL run; returns the summary (also written to out/rl_summary.json).
    `held`: where the output folder's lock is kept; None: no lock."""
    t_start = time.perf_counter()
    model_ref = resolve_model(cfg.model)  # a folder or hub id; every load below reads its local folder
    cfg = replace(cfg, model=model_ref.path)
    device = trainer_device(cfg)
    out = Path(cfg.out)

    # 1. inputs, all checked before anything is written
    tokenizer, examples, reward_fn = check_inputs(cfg)
    snapshots = snapshot_steps(cfg)
    max_model_len = longest_sequence(cfg, examples)
    if held is not None:
        held.enter_context(locked(out))  # one run per output folder

    # 2. resume from the last checkpoint made with the same settings
    made_from, ckpt, state = resume_state(cfg, out, examples, model_ref)
    start_step = state["step"] if state else 0
    source = str(ckpt) if state else cfg.model
    log.info("%s from %s: %d prompts in the pool, %d steps of %d prompts x %d samples",
             f"resuming at step {start_step}" if state else "training", source, len(examples), cfg.steps,
             cfg.prompts_per_step, cfg.samples_per_prompt)

    # 3. models, optimizer, engine; the engine starts from the same weights as the trainer
    lm, ref, optimizer, engine = build_models(cfg, source, state, device, max_model_len, start_step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # 4. outputs: the prompt pool, the metric lines the checkpoint holds, the progress bar, the tracker
    metrics_path, errors_path = start_outputs(out, examples, start_step if state else None)
    bar = records.progress_bar("rl", cfg.steps, start_step, cfg.progress)
    tracker = open_tracker(cfg.report_to, out, f"rl {out.name}", asdict(cfg), start_step)

    # 5. the loop: rollouts, rewards, update; a metrics line; a snapshot or checkpoint where due
    try:
        for step in range(start_step, cfg.steps):
            metrics, errors = rl_step(cfg, step, examples, tokenizer, reward_fn, engine, lm, ref, optimizer, device,
                                      autocast, errors_path)
            record_step(metrics, errors, metrics_path, errors_path, tracker, bar)
            save_step(cfg, out, step + 1, lm, optimizer, tokenizer, made_from, snapshots)
    finally:
        bar.close()
        tracker.close()
        engine.close()

    # 6. the final HF folder and the summary
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps = records.read_lines(metrics_path)
    summary = {
        "model": str(Path(cfg.model).resolve()), "model_ref": asdict(model_ref), "out": str(out), "steps": cfg.steps,
        "resumed_from_step": start_step if state else None, **learning_summary(steps),
        "prompt_pool": len(examples), "prompt_source": cfg.prompt_set.source(),
        "seconds": round(time.perf_counter() - t_start, 2), "config": asdict(cfg),
    }
    write_json_atomic(summary, out / "rl_summary.json")
    return summary


def format_summary(s: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return (f"rl: {s['steps']} steps, mean reward {f(s['mean_reward_first'])} -> {f(s['mean_reward_last'])}, "
            f"pass rate {f(s['pass_rate_first'])} -> {f(s['pass_rate_last'])} (first/last {s['window_steps']} "
            f"steps), {s['seconds']}s; model in {s['out']}")


def run(cfg: RLConfig) -> dict:
    """Train `cfg`; its summary (rl_summary.json)."""
    with ExitStack() as held:
        return train(cfg, held)


STAGE = Stage(RLConfig, run, format_summary, __doc__, log="rl.log")


def main(argv=None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
