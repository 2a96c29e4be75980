"""PEAR against plain SFT: optimizer-step time on the same batches, in one process, and peak memory.

    python -m bench.bench_sft [--scores runs/score] [--steps 30] [--token-budget 2048] [--threads 1]

Arms: uniform (plain SFT), pear (stored weights), pear+variant (weights recomputed from the stored
logprobs every step, block variant), pear-live (delta from the current model's logprobs). Each arm
trains its own copy of the model with `train.sft.optimizer_step` (the trainer's own step) on the
same micro-batches; the arms take turns step by step, in a rotating order, so that the machine's
drift hits them alike, and each arm steps `--repeats` times on each batch, the fastest counting.
Reported: median step time per arm and its ratio to uniform (target for pear: at most 1.03), as
the median over batches of the paired per-batch ratio. Peak memory of one
step on the largest micro-batch, over what was live before it: `max_memory_allocated` on GPU, the
profiler's allocator events on CPU. JSON goes to $OUT/bench_sft.json, else bench/results/.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import console
from common.config import cli, field, setup_logging
from scorer.shards import list_shards, read_meta
from scorer.weights import WeightParams
from train.data import collate, load_rows, plan_epoch, split_heldout, stored_weight_params
from train.sft import ResponseLogprobs, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("uniform", "pear", "pear+variant", "pear-live")


def arm_setting(arm: str, meta: dict) -> tuple[str, WeightParams | None]:
    """(weighting, params) of an arm, as train.sft would use them."""
    if arm == "pear+variant":
        return "pear", WeightParams("block")
    if arm == "pear-live":
        return "pear-live", stored_weight_params(meta)
    return arm, None


def setup(args):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    meta = read_meta(list_shards(args.scores)[0])
    model_dir = args.model or meta["target_model"]["path"]
    rows, meta = load_rows(args.scores, AutoConfig.from_pretrained(model_dir).vocab_size)
    rows, _ = split_heldout(rows, 0.05)
    plan = plan_epoch(rows.lengths, args.token_budget, 0, 0)
    # the same micro-batches for every arm, collated once: the bench times the step, not the collate
    batches = [collate(rows, plan[i % len(plan)]).to(device) for i in range(args.steps + args.warmup)]
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return device, meta, batches, load


def make_arm(load, chunk: int):
    net = ResponseLogprobs(load(), chunk).train()
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4)


def step(net, opt, batch, weighting, params, device, autocast) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    optimizer_step(net, opt, [batch], weighting, params, batch.num_tokens, 1, 1.0, autocast, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def cpu_step_peak_mib(net, opt, batch, weighting, params, device, autocast) -> float:
    """Peak bytes the CPU allocator held during one step, over what was live before it (MiB).

    Read from the profiler's memory events ("Total Allocated" counts from the step's start); a
    process's peak RSS cannot be reset, and the model's load dwarfs a small model's step.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(net, opt, batch, weighting, params, device, autocast)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    peak = max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)
    return round(peak / 2**20, 3)


def say(*lines) -> None:
    """A result line on the terminal (stdout goes to the log while quiet)."""
    print(*lines, file=console.out(), flush=True)


@dataclass
class SFTBenchConfig:
    """PEAR against plain SFT: optimizer-step time on the same batches, and peak memory."""

    scores: str = field("runs/score", "scored shards (runs/score: the embedded corpus, scored first when empty)")
    model: str = field("", "empty: the shards' target model")
    steps: int = field(30, "timed batches")
    warmup: int = field(3, "untimed batches first")
    repeats: int = field(3, "steps per arm on each batch; the fastest counts")
    token_budget: int = field(2048, "padded tokens (rows x longest row) per micro-batch")
    loss_chunk: int = field(2048, "tokens per chunk of the vocabulary projection")
    threads: int = field(1, "CPU threads (1: steadier on a shared machine)")


def run(args: SFTBenchConfig) -> None:
    """The timing and the memory of every arm; the result lines on the terminal, the JSON written."""
    from pipelines.sft import ensure_scores

    # the terminal: its own lines
    console.quiet(Path(os.environ.get("OUT") or ROOT / "runs" / "bench") / "bench_sft.log")

    ensure_scores(args.scores)  # the embedded corpus is scored first when runs/score is empty

    device, meta, batches, load = setup(args)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    arms = {a: (*make_arm(load, args.loss_chunk), *arm_setting(a, meta)) for a in ARMS}
    times = {a: [] for a in ARMS}
    for i, batch in enumerate(batches):
        best = {a: float("inf") for a in ARMS}
        for r in range(args.repeats):
            k = (i * args.repeats + r) % len(ARMS)
            for a in ARMS[k:] + ARMS[:k]:  # rotate who goes first
                net, opt, weighting, params = arms[a]
                best[a] = min(best[a], step(net, opt, batch, weighting, params, device, autocast))
        if i >= args.warmup:
            for a in ARMS:
                times[a].append(best[a])  # the least-disturbed of the repeats

    # peak memory of one step per arm, on the largest micro-batch, after the timing (Adam state exists)
    largest = max(batches, key=lambda b: b.input_ids.numel())
    memory = {}
    for a, (net, opt, weighting, params) in arms.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(net, opt, largest, weighting, params, device, autocast)
            memory[a] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 3)
        else:
            memory[a] = cpu_step_peak_mib(net, opt, largest, weighting, params, device, autocast)

    # paired by batch: each step's time over uniform's on the same micro-batch, then the median,
    # robust to bursts of other load on a shared machine
    ratio = {a: statistics.median(t / u for t, u in zip(times[a], times["uniform"])) for a in ARMS}
    med = {a: statistics.median(t) for a, t in times.items()}
    tokens = sum(b.real_tokens for b in batches[args.warmup:]) / len(times["uniform"])
    result = {
        "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "steps": args.steps, "token_budget": args.token_budget, "tokens_per_step": round(tokens, 1),
        "median_step_s": {a: round(v, 5) for a, v in med.items()},
        "ratio_to_uniform": {a: round(v, 4) for a, v in ratio.items()},
        "ratio_of_medians": {a: round(med[a] / med["uniform"], 4) for a in ARMS},
        "step_peak_memory_mib": memory, "largest_micro_batch": list(largest.input_ids.shape),
        "target_pear_ratio": 1.03,
    }
    say(f"{'arm':13} {'median step':>12} {'ratio':>7} {'ratio of medians':>16} {'step peak memory':>17}")
    for a in ARMS:
        say(f"{a:13} {med[a] * 1000:10.2f}ms {ratio[a]:7.3f} {result['ratio_of_medians'][a]:16.3f} "
              f"{memory[a]:13.2f} MiB")
    say(f"PEAR/uniform step time: {ratio['pear']:.3f} (target <= 1.03); {tokens:.0f} tokens per step on {device}; "
          f"peak memory PEAR/uniform {memory['pear'] / memory['uniform']:.3f}")
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_sft.json").write_text(json.dumps(result, indent=1) + "\n")
    say(f"written {folder / 'bench_sft.json'}")


def main(argv=None) -> int:
    setup_logging()
    # the result lines go out as run() writes them
    return cli(SFTBenchConfig, argv, __doc__, run, lambda _: None)


if __name__ == "__main__":
    sys.exit(main())
