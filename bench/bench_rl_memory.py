"""Peak memory of one RL training step against the batch size, with and without the token budget.

    python -m bench.bench_rl_memory [--sizes 8,16,32] [--modes budget,checkpointing,whole] [--engine] [--smoke]
    python -m bench.bench_rl_memory --reuse earlier.json      # measure only the runs earlier.json lacks

The model: a random-init SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 KV heads,
intermediate 1536, vocabulary 49,152, tied embeddings; 134.5M parameters) built here from its
config (nothing is downloaded), float32 on the CPU as `train.rl` runs it. `--smoke`: a 2-layer,
64-wide model, sizes 2,4 and a budget of 256 tokens (seconds a run; what the tests run).

Each size x mode runs in a fresh subprocess (so peaks do not mix), which loads the policy, the
reference and AdamW as `train.rl` does and runs one step of the trainer's own code
(`train.rl.update_policy`: the no-grad passes of the policy and the reference, then the
accumulated forward/backward and the optimizer step) on P prompts x 8 samples. The rollouts are
synthetic by default: prompts of 26-34 random token ids, responses of exactly 64 random ids over
the whole vocabulary (a random model never stops early, and full-length responses are the worst
case); the bench says so. `--engine` samples them from a real vLLM engine in the same process
instead (the engine's weights and KV cache then count too, and its generation time).

Modes: `whole` is the old behaviour (the whole batch in one forward and backward,
`--micro-batch-tokens 0`, glibc's malloc as it comes), the baseline; `budget` is `train.rl`'s
default token budget (and its fixed malloc threshold, `train.rl.keep_malloc_threshold`);
`checkpointing` adds `--gradient-checkpointing`.

Peak: the process's peak RSS (VmHWM) over the step, reset just before it (so the loading of the
models does not count; the models, AdamW's state and everything else live during the step do).
The parent watches each child's RSS and stops one that passes `--rss-cap-gib` (default 85% of
the machine's memory): that run is reported as over the cap, not as a number. The child writes
its result to a JSON file, not to stdout; the parent prints one line per run and the ratios,
and rewrites bench/results/bench_rl_memory.json after every run (`--out` elsewhere; `--smoke`
writes only with --out). A whole bench takes an hour or more on 2 cores: `--reuse` keeps the runs
of earlier JSON files (comma-separated) made with the same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, cli, field

ROOT = Path(__file__).resolve().parents[1]
MODES = ("budget", "checkpointing", "whole")
SMOKE_BUDGET = 256  # the tiny model's runs: a budget that cuts a batch of 2 x 8 into micro-batches
# SmolLM2-135M(-Instruct)'s architecture
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    hidden_act="silu")
TINY = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=512)  # vLLM CPU: head_dim >= 32


def proc_kib(pid: int | str, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def mem_total_gib() -> float:
    return int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20


def build_model(folder: Path, shape: dict) -> int:
    """A random-init Llama of `shape` saved as an HF folder; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**shape))
    lm.save_pretrained(folder)
    return sum(p.numel() for p in lm.parameters())


# ---- the child: one RL step, its peak ------------------------------------------------------------

def child(spec: dict) -> dict:
    """Load as train.rl does, then one step of P x n rollouts; the step's peak RSS."""
    from contextlib import nullcontext

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from train.rl import RLConfig, keep_malloc_threshold, rollout_batch, update_policy
    from train.rl_math import group_advantages
    from train.rollout import Sample

    torch.set_num_threads(spec["threads"] or max(1, os.cpu_count() or 1))  # as train.rl sets up the CPU
    if not spec.get("glibc_default"):
        keep_malloc_threshold()
    torch.manual_seed(0)
    P, n, R = spec["prompts"], spec["samples"], spec["response_tokens"]
    cfg = RLConfig(prompts_per_step=P, samples_per_prompt=n, max_new_tokens=R,
                   micro_batch_tokens=spec["micro_batch_tokens"], gradient_checkpointing=spec["checkpointing"])
    load = lambda: AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)  # noqa: E731
    lm = load()
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = load().eval()  # train.rl keeps the reference by default (track_kl)
    ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    vocab = lm.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, vocab, size=int(rng.integers(26, 35)))] for _ in range(P)]
    engine = None
    if spec["engine"]:
        from train.rollout import RolloutEngine

        engine = RolloutEngine(spec["model"], max(len(p) for p in prompts) + R, seed=0,
                               cpu_kv_cache_gib=cfg.cpu_kv_cache_gib)
    ready_gib = proc_kib("self", "VmRSS") / 2**20

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    t0 = time.perf_counter()
    if engine is not None:
        samples = [s for g in engine.generate(prompts, n, cfg.temperature, R) for s in g]
    else:
        samples = [Sample([int(t) for t in rng.integers(3, vocab, size=R)],
                          np.full(R, -np.log(vocab), dtype=np.float32), False) for _ in range(P * n)]
    t_gen = time.perf_counter() - t0
    rewards = torch.tensor(rng.integers(0, 2, size=(P, n)), dtype=torch.float32)
    advantages = group_advantages(rewards, cfg.advantage_scale).reshape(-1)  # (B,)
    rb = rollout_batch([p for p in prompts for _ in range(n)], samples, torch.device("cpu"))
    after = (lambda: engine.push_weights(lm)) if engine is not None else (lambda: None)
    _, _, _, losses, _ = update_policy(lm, ref, optimizer, rb, advantages, cfg, nullcontext(), after)
    seconds = time.perf_counter() - t0
    peak_gib = proc_kib("self", "VmHWM") / 2**20
    if engine is not None:
        engine.close()
    from train.rl_math import micro_batches

    return {"peak_gib": round(peak_gib, 3), "ready_gib": round(ready_gib, 3),
            "step_over_ready_gib": round(peak_gib - ready_gib, 3), "seconds": round(seconds, 1),
            "gen_seconds": round(t_gen, 1), "sequences": P * n, "tokens": int(rb.lengths.sum()),
            "padded_tokens": int(len(rb.lengths) * rb.lengths.max()),
            "micro_batches": len(micro_batches(rb.lengths, cfg.micro_batch_tokens)),
            "response_tokens": int(rb.response_mask.sum()), "loss": losses["loss"]}


# ---- the parent: one child per run ---------------------------------------------------------------

def run_child(spec: dict, cap_gib: float, timeout_s: float) -> dict:
    """`spec` in a fresh process, stopped when its RSS passes `cap_gib` or it runs past `timeout_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "child.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bench.bench_rl_memory", "--child", json.dumps(spec),
                                     "--result", str(result)], cwd=ROOT, env=env, stdout=err, stderr=err,
                                    start_new_session=True)
            t0, seen, why = time.time(), 0, None
            while proc.poll() is None:
                seen = max(seen, proc_kib(proc.pid, "VmRSS"))
                if seen / 2**20 > cap_gib:
                    why = f"over the {cap_gib:.1f} GiB cap"
                elif time.time() - t0 > timeout_s:
                    why = f"over {timeout_s:.0f} s"
                if why:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
        if why:
            return {"stopped": why, "rss_seen_gib": round(seen / 2**20, 3)}
        if proc.returncode != 0 or not result.exists():
            tail = log.read_text()[-1500:]
            return {"failed": f"exit {proc.returncode}", "log_tail": tail}
        return json.loads(result.read_text())


def describe(r: dict) -> str:
    if "stopped" in r:
        return f"stopped {r['stopped']} (RSS seen {r['rss_seen_gib']:.2f} GiB)"
    if "failed" in r:
        return f"failed ({r['failed']})"
    return (f"peak {r['peak_gib']:6.2f} GiB (models+optimizer ready {r['ready_gib']:.2f}, "
            f"step +{r['step_over_ready_gib']:.2f}), {r['micro_batches']} micro-batch(es), {r['seconds']:.0f} s")


def ratios_of(runs: list[dict], modes: list[str], sizes: list[int], n: int) -> dict:
    """Peak of the largest size over the smallest, per mode, and each budgeted mode's against the
    old behaviour's smallest."""
    peak = {(r["mode"], r["prompts"]): r.get("peak_gib") for r in runs}
    lo, hi = min(sizes), max(sizes)
    ratios = {}
    for mode in modes:
        if lo < hi and peak.get((mode, lo)) and peak.get((mode, hi)):
            ratios[f"{mode} {hi}x{n} / {mode} {lo}x{n}"] = round(peak[(mode, hi)] / peak[(mode, lo)], 3)
        if mode != "whole" and peak.get(("whole", lo)) and peak.get((mode, hi)):
            ratios[f"{mode} {hi}x{n} / whole {lo}x{n}"] = round(peak[(mode, hi)] / peak[("whole", lo)], 3)
    return ratios


def write_result(out: str, settings: dict, params: int, cap: float, runs: list[dict], ratios: dict) -> None:
    import platform

    import torch
    import transformers

    result = {**settings, "params": params, "rss_cap_gib": round(cap, 2), "runs": runs, "ratios": ratios,
              "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(mem_total_gib(), 1),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")


@dataclass
class MemoryBenchConfig:
    """Peak memory of one RL training step against the batch size."""

    sizes: str = field("", "prompts per step, comma-separated; empty: 8,16,32 (smoke 2,4)")
    samples: int = field(8, "samples per prompt")
    response_tokens: int = field(64, "tokens of each synthetic response")
    modes: str = field(",".join(MODES), f"some of {','.join(MODES)}")
    micro_batch_tokens: int | None = field(None, "the budget of `budget` and `checkpointing`; None: train.rl's "
                                                 "(smoke 256)")
    engine: bool = field(False, "sample the rollouts from a vLLM engine in the child")
    smoke: bool = field(False, "a tiny model and sizes 2,4: seconds")
    threads: int = field(0, "torch threads of each child; 0: all cores")
    rss_cap_gib: float | None = field(None, "stop a child past this RSS; None: 85% of RAM")
    timeout_s: float = field(3600.0, "stop a child that runs longer (seconds)")
    out: str = field("", "result JSON, rewritten after every run; empty: bench/results/bench_rl_memory.json "
                         "(--smoke: none)")
    reuse: tuple[str, ...] = field((), "JSON files of earlier runs, comma-separated: their runs made with the "
                                       "same settings are kept, not measured again")
    # the parent starts each run as a child process with these two
    child: str = field("", argparse.SUPPRESS)
    result: str = field("", argparse.SUPPRESS)

    def __post_init__(self):  # before any work: one line, exit code 2
        try:
            sizes = self.size_list()
        except ValueError:
            sizes = []
        modes = self.mode_list()
        if not sizes or min(sizes) < 1 or not modes or set(modes) - set(MODES):
            raise ConfigError(f"--sizes takes positive integers, --modes some of {MODES}")

    def size_list(self) -> list[int]:
        return [int(x) for x in (self.sizes or ("2,4" if self.smoke else "8,16,32")).split(",")]

    def mode_list(self) -> list[str]:
        return [m for m in self.modes.split(",") if m]


def run(a: MemoryBenchConfig) -> tuple[list[dict], dict, str | None]:
    """Every size x mode in a child of its own, one line each as it ends; returns (the runs, the ratios,
    the JSON written or None). In a child (`--child`): its one run, the result to `--result`."""
    if a.child:  # the result goes to a file: the console may be redirected
        Path(a.result).write_text(json.dumps(child(json.loads(a.child))))
        return [], {}, None

    from train.rl import RLConfig

    sizes, modes = a.size_list(), a.mode_list()
    budget = a.micro_batch_tokens if a.micro_batch_tokens is not None else \
        SMOKE_BUDGET if a.smoke else RLConfig.micro_batch_tokens
    cap = a.rss_cap_gib or 0.85 * mem_total_gib()
    shape = TINY if a.smoke else SMOLLM2_135M
    rollouts = "sampled by a vLLM engine in the same process" if a.engine else \
        f"synthetic: prompts of 26-34 and responses of {a.response_tokens} random token ids"
    out = a.out or (None if a.smoke else str(ROOT / "bench" / "results" / "bench_rl_memory.json"))
    settings = {"bench": "bench_rl_memory", "model_shape": shape, "dtype": "float32", "rollouts": rollouts,
                "samples_per_prompt": a.samples, "response_tokens": a.response_tokens, "micro_batch_tokens": budget}
    done = {}  # (mode, prompts) -> a measured run of an earlier file with the same settings
    for path in filter(None, a.reuse):
        earlier = json.loads(Path(path).read_text())
        if all(earlier.get(k) == v for k, v in settings.items()):
            done.update({(r["mode"], r["prompts"]): r for r in earlier["runs"] if "peak_gib" in r})
    tmp = Path(tempfile.mkdtemp(prefix="bench_rl_memory_"))
    runs = []
    try:
        params = build_model(tmp / "model", shape)
        print(f"bench_rl_memory: random-init Llama {shape['num_hidden_layers']} layers x {shape['hidden_size']}, vocab "
              f"{shape['vocab_size']} ({params / 1e6:.1f}M params, float32, CPU); one RL step per run, rollouts "
              f"{rollouts}; budget {budget} tokens; each run in its own process", flush=True)
        for mode in modes:
            for P in sizes:
                spec = {"model": str(tmp / "model"), "prompts": P, "samples": a.samples,
                        "response_tokens": a.response_tokens, "micro_batch_tokens": 0 if mode == "whole" else budget,
                        "checkpointing": mode == "checkpointing", "engine": a.engine, "threads": a.threads,
                        "glibc_default": mode == "whole"}
                r = done.get((mode, P)) or {"mode": mode, "prompts": P, "samples": a.samples,
                                            **run_child(spec, cap, a.timeout_s)}
                runs.append(r)
                print(f"  {mode:13s} {P:3d} x {a.samples}: {describe(r)}{' (reused)' if (mode, P) in done else ''}",
                      flush=True)
                if out:
                    write_result(out, settings, params, cap, runs, ratios_of(runs, modes, sizes, a.samples))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return runs, ratios_of(runs, modes, sizes, a.samples), out


def report(result: tuple[list[dict], dict, str | None]) -> str:
    _, ratios, out = result
    lines = [f"  ratio {name}: {v:.2f}" for name, v in ratios.items()]
    return "\n".join(lines + ([f"  wrote {out}"] if out else []))


def main(argv=None) -> int:
    # exit code 1 when a run other than the old behaviour's was stopped or failed
    return cli(MemoryBenchConfig, argv, __doc__, run, report,
               status=lambda result: 0 if all("peak_gib" in r for r in result[0] if r["mode"] != "whole") else 1)


if __name__ == "__main__":
    sys.exit(main())
