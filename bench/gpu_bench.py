"""GPU benchmark of torch scoring variants and of the SFT step, in one process on one card.

Random-init Qwen2.5-1.5B-shaped model in bf16 and the anchors' data (192 sequences of 256..2048
tokens, torch.Generator().manual_seed(1)). Every scoring variant is timed against the naive
baseline (batches of 8 padded with a mask, full logits, float32 log_softmax) measured in this
same process, and its logprobs are compared with the baseline's.

    python bench/gpu_bench.py                   # GPU machine: about 4 minutes on an H200
    python bench/gpu_bench.py --tiny            # CPU smoke run of every code path (tiny Qwen2)
    python bench/gpu_bench.py --budget-s 200    # skip the variants that would not fit in time

One line per variant, `name: tok/s, peak GiB, ratio vs naive`; everything goes to
$OUT/gpu_bench.json (or bench/results/gpu_bench.json), rewritten after each measurement.
Imports only torch, numpy, transformers and the repository's scorer/engines.py, scorer/weights.py,
train/loss.py and the common/ helpers these use (batching, the vLLM engine's start-up).
"""
import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.batching import length_sorted_batches  # noqa: E402
from scorer.engines import TorchScorer, packed_attention  # noqa: E402
from scorer.weights import WeightParams, pear_weights  # noqa: E402
from train.loss import token_logprobs, weighted_nll  # noqa: E402

# argparse, not common.config.cli: carried to a bare GPU machine, it imports only the files its docstring names
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--tiny", action="store_true", help="tiny Qwen2 on the CPU, budgets scaled down: a smoke run")
p.add_argument("--nseq", type=int, default=None, help="number of sequences (192 full, 16 tiny)")
p.add_argument("--budget-s", type=float, default=300.0, help="skip any variant that would end past this many seconds")
p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
p.add_argument("--only", choices=("scoring", "sft"), default=None, help="run one section only")
p.add_argument("--repeats", type=int, default=3, help="SFT: alternate uniform and PEAR steps this many times")
args = p.parse_args()

# ---- setup: device, output, helpers ---------------------------------------------------------
T0 = time.perf_counter()
dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
cuda = dev == "cuda"
dt = torch.bfloat16 if cuda else torch.float32
R = {"device": dev, "gpu": torch.cuda.get_device_name() if cuda else None,
     "gpu_GiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
     "torch": torch.__version__, "transformers": transformers.__version__, "args": vars(args), "scoring": {}, "sft": {},
     "skipped": {}}
out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
out_path = out_dir / ("gpu_bench_tiny.json" if args.tiny else "gpu_bench.json")


def save():
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(R, indent=1))


def sync():
    if cuda:
        torch.cuda.synchronize()


def fresh():
    """Drop what the last variant left, so that each peak is its own."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None


def fits(section, name, est_s):
    """False (and recorded as skipped) when the variant would likely end past --budget-s."""
    if args.only and section != args.only:
        return False
    spent = time.perf_counter() - T0
    if spent + est_s <= args.budget_s:
        return True
    R["skipped"][name] = f"budget: {spent:.0f}s spent, about {est_s:.0f}s more needed"
    print(f"{section}/{name}: skipped (budget)", flush=True)
    save()
    return False


def failed(section, name, e):
    R[section][name] = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:300]}"
    print(f"{name}: {R[section][name]}", flush=True)
    if not isinstance(e, torch.OutOfMemoryError):
        traceback.print_exc()
    save()


# ---- matmul rate, model, data (same as the anchors) ---------------------------------------------
n = 8192 if cuda else 512
a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
a @ b
sync()
t = time.perf_counter()
for _ in range(10):
    a @ b
sync()
R["matmul_tflops"] = round(2 * n**3 * 10 / (time.perf_counter() - t) / 1e12, 2)
del a, b

if args.tiny:
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000, max_position_embeddings=4096)
    lo, hi, nseq, K = 16, 128, args.nseq or 16, 16  # K: tokens per "k" of a budget, so batches stay several
else:
    cfg = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                      tie_word_embeddings=True)
    lo, hi, nseq, K = 256, 2048, args.nseq or 192, 1024
torch.manual_seed(0)
torch.set_default_dtype(dt)
with torch.device(dev):
    model = Qwen2ForCausalLM(cfg).eval()
torch.set_default_dtype(torch.float32)
model.config._attn_implementation = "sdpa"
nparams = sum(x.numel() for x in model.parameters())
g = torch.Generator().manual_seed(1)
lens = torch.randint(lo, hi + 1, (nseq,), generator=g).tolist()
seqs = [torch.randint(0, cfg.vocab_size, (L,), generator=g) for L in lens]  # (L,) int64 each
seq_lists = [x.tolist() for x in seqs]
ntok = sum(lens)
WARM = sorted(range(nseq), key=lambda i: lens[i])[-max(nseq // 8, 2):]  # the longest: full-size batches
R.update(params_M=round(nparams / 1e6, 1), tokens=ntok, nseq=nseq, setup_s=round(time.perf_counter() - T0, 1))
print(f"device {dev} {R['gpu'] or ''} matmul {R['matmul_tflops']} TFLOP/s, {R['params_M']}M params, "
      f"{ntok} tokens", flush=True)


# ---- scoring: naive baseline, then the variants ---------------------------------------------
def naive(batch_seqs, bs=8):
    """The anchor's naive scoring: padded batches with a mask, full logits, float32 log_softmax."""
    res = []
    with torch.no_grad():
        for i in range(0, len(batch_seqs), bs):
            chunk = batch_seqs[i : i + bs]
            T = max(len(x) for x in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for j, x in enumerate(chunk):
                ids[j, : len(x)], mask[j, : len(x)] = torch.as_tensor(x), 1
            ids, mask = ids.to(dev), mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
            res += [lp[j, : len(x) - 1].numpy() for j, x in enumerate(chunk)]
    return res


def diff(got, ref):
    d = np.concatenate([np.abs(x - y) for x, y in zip(got, ref)])
    return float(d.max()), float(d.mean())


ref, naive_tps, unit_s = None, None, 1.0  # unit_s: the naive pass, to size the budget estimates


def bench_scoring(name, score, est_s, full_warmup=False):
    """Time `score(list of sequences) -> logprobs of tokens 1..n-1` on all sequences, after a warmup."""
    if not fits("scoring", name, est_s):
        return None
    fresh()
    try:
        t = time.perf_counter()
        score(seq_lists if full_warmup else [seq_lists[i] for i in WARM])  # compiles, grows the allocator
        sync()
        warm_s = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        lps = score(seq_lists)
        sync()
        s = time.perf_counter() - t
    except Exception as e:  # OOM, compile failure, missing kernel: report it and go on
        failed("scoring", name, e)
        fresh()
        return None
    rec = {"tok_per_s": round(ntok / s), "s": round(s, 3), "peak_GiB": peak_gib(), "warmup_s": round(warm_s, 1)}
    if naive_tps:
        rec["vs_naive"] = round(rec["tok_per_s"] / naive_tps, 3)
    if ref is not None:
        rec["max_abs_diff"], rec["mean_abs_diff"] = diff(lps, ref)
    R["scoring"][name] = rec
    print(f"{name}: {rec['tok_per_s']} tok/s, peak {rec['peak_GiB']} GiB, x{rec.get('vs_naive', 1.0)} vs naive"
          + (f", max|d| {rec['max_abs_diff']:.3g} mean|d| {rec['mean_abs_diff']:.2g}" if ref is not None else ""),
          flush=True)
    save()
    return lps


def torch_scorer(**kw):
    scorer = TorchScorer(model, **kw)
    return lambda batch: scorer.score(batch, [1] * len(batch))  # prompt of 1 token: all the rest scored


def before_change(batch, token_budget=32 * K, chunk_size=8 * K):
    """TorchScorer.score as it was before the attention/logits options (sync per batch, train.loss)."""
    body, head = model.get_decoder(), model.get_output_embeddings().weight
    result = [None] * len(batch)
    with torch.inference_mode():
        for idx in length_sorted_batches([len(x) for x in batch], token_budget):
            T = max(len(batch[i]) for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, : len(batch[i])] = torch.tensor(batch[i])
            ids = ids.to(dev, non_blocking=True)
            hidden = body(input_ids=ids).last_hidden_state
            rows = torch.cat([torch.full((len(batch[i]) - 1,), j) for j, i in enumerate(idx)]).to(dev)
            cols = torch.cat([torch.arange(0, len(batch[i]) - 1) for i in idx]).to(dev)
            lp = token_logprobs(hidden[rows, cols], head, ids[rows, cols + 1], chunk_size).cpu().numpy()
            s = 0
            for i in idx:
                result[i] = lp[s : s + len(batch[i]) - 1]
                s += len(batch[i]) - 1
    return result


t = time.perf_counter()
ref = bench_scoring("naive_bs8", naive, est_s=0, full_warmup=True)  # warmed up on every shape, as the anchor
if ref is None and args.only != "sft":
    ref = naive(seq_lists)  # (an OOM there would leave no baseline to compare with)
naive_rec = R["scoring"].get("naive_bs8")
naive_tps = naive_rec["tok_per_s"] if isinstance(naive_rec, dict) else None
if naive_tps:
    naive_rec["vs_naive"] = 1.0
unit_s = (time.perf_counter() - t) / 1.2 if cuda else 1.0
floor_n = min(16, nseq)
if ref is not None:
    R["bf16_noise_floor"] = dict(zip(("max_abs_diff", "mean_abs_diff"),
                                     diff(naive(seq_lists[:floor_n], bs=1), ref[:floor_n])))
    R["bf16_noise_floor"]["what"] = f"naive unbatched vs naive batches of 8, first {floor_n} sequences"
    print(f"noise floor (batch 1 vs 8): max|d| {R['bf16_noise_floor']['max_abs_diff']:.3g}, "
          f"mean|d| {R['bf16_noise_floor']['mean_abs_diff']:.2g}", flush=True)

bench_scoring("padded.32k.c8k.fp32 (pre-change TorchScorer code)", before_change, est_s=1.2 * unit_s)
EAGER = {  # name -> TorchScorer options; budgets in units of K tokens (1024 here, 16 with --tiny)
    "TorchScorer defaults": dict(),
    "padded.32k.c4k.fp32": dict(chunk_size=4 * K),
    "padded.32k.c4k.native": dict(chunk_size=4 * K, upcast_logits=False),
    "padded.64k.c4k.native": dict(token_budget=64 * K, chunk_size=4 * K, upcast_logits=False),
    "packed.32k.c4k.fp32": dict(attention="packed", chunk_size=4 * K),
    "packed.32k.c4k.native": dict(attention="packed", chunk_size=4 * K, upcast_logits=False),
    "packed.32k.c8k.native": dict(attention="packed", chunk_size=8 * K, upcast_logits=False),
    "packed.16k.c4k.native": dict(attention="packed", token_budget=16 * K, chunk_size=4 * K, upcast_logits=False),
    "packed.64k.c4k.native": dict(attention="packed", token_budget=64 * K, chunk_size=4 * K, upcast_logits=False),
}
def eager_options(name):
    """The options a variant of EAGER runs with: the defaults as they are (compiled on a GPU), the
    rest uncompiled, at 32k/8k unless named."""
    if name == "TorchScorer defaults":
        return EAGER[name]
    return {"token_budget": 32 * K, "chunk_size": 8 * K, "compile": False, **EAGER[name]}


def uncompile():
    """Eager layers again (nn.Module.compile keeps the compiled forward in `_compiled_call_impl`)."""
    for layer in model.get_decoder().layers:
        layer._compiled_call_impl = None


for name in EAGER:
    bench_scoring(name, torch_scorer(**eager_options(name)), est_s=1.2 * unit_s)
    uncompile()  # the defaults compile the shared model's layers in place (on a GPU); the rest run eager
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    R["varlen_attn"] = "used by packed" if cuda else "skipped: needs CUDA; packed ran one SDPA call per sequence"
except ImportError:
    R["varlen_attn"] = "absent from this torch; packed ran one SDPA call per sequence"


# ---- profile: where the time of the best eager variant goes ------------------------------------
def category(kernel):
    k = kernel.lower()
    for cat, keys in (("triton (compiled)", ("triton",)), ("attention", ("flash", "fmha", "attention")),
                      ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "addmm", "aten::mm", "linear")),
                      ("softmax/CE", ("softmax", "nll", "cross_entropy", "logsumexp")),
                      ("reduce", ("reduce", "amax", "sum")),
                      ("copy/index", ("copy", "cat", "index", "gather", "memcpy", "memset", "fill")),
                      ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "mul", "add", "silu"))):
        if any(x in k for x in keys):
            return cat
    return "other"


def profile(name, score):
    """Kernel time by category and the top kernels, for one pass over the warmup set."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = [seq_lists[i] for i in WARM]
    score(batch)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        score(batch)
        sync()
    times = {}
    for e in prof.key_averages():
        if cuda and str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        us = ((getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if cuda
              else e.self_cpu_time_total)
        if us > 0:
            times[e.key] = times.get(e.key, 0) + us
    total = sum(times.values()) or 1
    by_cat = {}
    for k, us in times.items():
        by_cat[category(k)] = by_cat.get(category(k), 0) + us
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    rec = {"total_ms": round(total / 1e3, 1), "tokens": sum(len(x) for x in batch),
           "by_category_pct": {c: round(100 * us / total, 1)
                               for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
           "top": [[k[:90], round(100 * us / total, 1)] for k, us in top]}
    R.setdefault("profile", {})[name] = rec
    print(f"profile {name}: {rec['by_category_pct']}", flush=True)
    save()


ok = {k: v for k, v in R["scoring"].items() if isinstance(v, dict) and k in EAGER and (v["peak_GiB"] or 0) <= 10}
best = max(ok, key=lambda k: ok[k]["tok_per_s"]) if ok else None
for name in dict.fromkeys([best, "TorchScorer defaults"]):
    if name and fits("profile", f"profile {name}", 1.0 * unit_s):
        try:
            profile(name, torch_scorer(**eager_options(name)))
            uncompile()
        except Exception as e:
            R.setdefault("profile", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"


# ---- torch.compile: the better eager attention first -----------------------------------------------
def tps(name):
    rec = R["scoring"].get(name)
    return rec["tok_per_s"] if isinstance(rec, dict) else 0


COMPILED = {  # the chunk function is compiled too: fused softmax, no float32 logits in memory
    "compiled.padded.32k.c8k.fp32": dict(compile=True),
    "compiled.packed.32k.c8k.fp32": dict(attention="packed", compile=True),
    "compiled.packed.64k.c8k.fp32": dict(attention="packed", token_budget=64 * K, compile=True),
}


def bench_compiled(name, est_s):
    if args.no_compile:
        R["skipped"][name] = "--no-compile"
        return
    bench_scoring(name, torch_scorer(**{"token_budget": 32 * K, "chunk_size": 8 * K, **COMPILED[name]}),
                  est_s=est_s, full_warmup=True)  # the full warmup pass compiles every shape it will meet


pick = "packed" if tps("packed.32k.c4k.native") >= tps("padded.32k.c4k.native") else "padded"
other = "padded" if pick == "packed" else "packed"
bench_compiled(f"compiled.{pick}.32k.c8k.fp32", est_s=120 if cuda else 60)
uncompile()  # the SFT steps below run eager


# ---- SFT step: forward+backward, (a) transformers' labels loss, (b) our weighted loss --------------
model.train()
body, head = model.get_decoder(), model.get_output_embeddings().weight


def right_pad(idx):
    T = max(lens[i] for i in idx)
    ids = torch.zeros(len(idx), T, dtype=torch.long)
    for j, i in enumerate(idx):
        ids[j, : lens[i]] = seqs[i]
    return ids.to(dev, non_blocking=True)


def prepare(idx, weighting):
    """What a data loader would hand over: response positions and their weights, on the device."""
    rows = torch.cat([torch.full((lens[i] - 1,), j) for j, i in enumerate(idx)])  # every token after the first
    cols = torch.cat([torch.arange(lens[i] - 1) for i in idx])
    if weighting == "uniform":
        w = torch.ones(len(rows))
    else:  # PEAR token weights from made-up target/behaviour logprobs
        resp = torch.zeros(len(idx), max(lens[i] for i in idx) - 1, dtype=torch.bool)
        for j, i in enumerate(idx):
            resp[j, : lens[i] - 1] = True
        target = -3 * torch.rand(resp.shape, generator=torch.Generator().manual_seed(len(idx)))
        behavior = target + 0.1 * torch.randn(resp.shape, generator=torch.Generator().manual_seed(1))
        w = pear_weights(target, behavior, resp, WeightParams())[resp]
    starts = np.cumsum([0] + [lens[i] for i in idx[:-1]])
    flat_pos = torch.cat([torch.arange(lens[i] - 1) + int(s) for s, i in zip(starts, idx)])  # packed layout
    return {k: v.to(dev) for k, v in dict(rows=rows, cols=cols, w=w, flat_pos=flat_pos).items()}


def step_hf(idx, _):
    ids = right_pad(idx)
    labels = ids.clone()
    for j, i in enumerate(idx):
        labels[j, lens[i] :] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach()


def step_weighted(idx, b):
    ids = right_pad(idx)
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, D)
    lp = token_logprobs(hidden[b["rows"], b["cols"]], head, ids[b["rows"], b["cols"] + 1], 4 * K)
    loss = weighted_nll(lp, b["w"], len(lp))
    loss.backward()
    return loss.detach()


def step_weighted_packed(idx, b):
    ids = torch.cat([seqs[i] for i in idx]).to(dev, non_blocking=True)  # (M,)
    position_ids = torch.cat([torch.arange(lens[i]) for i in idx]).to(dev, non_blocking=True)
    cu = torch.tensor(np.cumsum([0] + [lens[i] for i in idx]), dtype=torch.int32).to(dev)
    longest = max(lens[i] for i in idx)
    with packed_attention(model):
        hidden = body(input_ids=ids[None], position_ids=position_ids[None], use_cache=False, cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).last_hidden_state[0]  # (M, D)
    lp = token_logprobs(hidden[b["flat_pos"]], head, ids[b["flat_pos"] + 1], 4 * K)
    loss = weighted_nll(lp, b["w"], len(lp))
    loss.backward()
    return loss.detach()


def bench_sft(name, step, weighting, budget):
    batches = length_sorted_batches(lens, budget)[::2]  # half the data, every length range
    if not fits("sft", name, 1.2 * unit_s):
        return
    prepared = [prepare(idx, weighting) for idx in batches]
    fresh()
    try:
        step(batches[-1], prepared[-1])  # warmup on the longest rows
        model.zero_grad(set_to_none=False)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        losses = [step(idx, b) for idx, b in zip(batches, prepared)]
        sync()
        s, peak = time.perf_counter() - t, peak_gib()
    except Exception as e:
        failed("sft", name, e)
        return
    finally:
        model.zero_grad(set_to_none=True)
        fresh()
    tokens = sum(lens[i] for idx in batches for i in idx)
    prev = R["sft"].get(name)
    runs = (prev["runs_s"] if isinstance(prev, dict) else []) + [round(s, 3)]
    s = float(np.median(runs))  # repeated calls (alternating arms) report the median pass
    rate = tokens / s
    rec = {"tok_per_s": round(rate), "s": round(s, 3), "runs_s": runs, "peak_GiB": peak, "tokens": tokens,
           "batches": len(batches), "mfu": round(6 * nparams * rate / (R["matmul_tflops"] * 1e12), 3),
           "loss_first_batch": float(losses[0])}
    R["sft"][name] = rec
    print(f"sft {name}: {rec['tok_per_s']} tok/s, peak {rec['peak_GiB']} GiB, MFU {rec['mfu']}", flush=True)
    save()


for budget in (8 * K, 16 * K):  # 8k first: transformers' own loss at 16k may not fit an H100
    tag = f"{budget // K}k"
    bench_sft(f"{tag}.hf_labels", step_hf, "uniform", budget)
    for _ in range(args.repeats):  # alternate, so that warm-up and clock drift hit both arms alike
        bench_sft(f"{tag}.weighted.uniform", step_weighted, "uniform", budget)
        bench_sft(f"{tag}.weighted.pear", step_weighted, "pear", budget)
    bench_sft(f"{tag}.weighted.pear.packed", step_weighted_packed, "pear", budget)
    model.gradient_checkpointing_enable()  # activations recomputed per decoder layer in backward
    bench_sft(f"{tag}.weighted.pear.checkpointed", step_weighted, "pear", budget)
    model.gradient_checkpointing_disable()
    u, pr = R["sft"].get(f"{tag}.weighted.uniform"), R["sft"].get(f"{tag}.weighted.pear")
    if isinstance(u, dict) and isinstance(pr, dict):
        R["sft"][f"{tag}.pear_over_uniform_step_time"] = round(pr["s"] / u["s"], 3)
        print(f"sft {tag}: PEAR / uniform step time {R['sft'][f'{tag}.pear_over_uniform_step_time']}", flush=True)
model.eval()
save()

# ---- torch.compile, second round: the other attention, a larger budget, and a profile ---------------
bench_compiled(f"compiled.{other}.32k.c8k.fp32", est_s=90 if cuda else 40)
bench_compiled("compiled.packed.64k.c8k.fp32", est_s=3 * unit_s)

# ---- the vLLM backend on the same model and data, where vllm is installed ------------------------
try:
    import vllm  # noqa: F401
except Exception as e:  # not installed (the GPU image has none), or a build that cannot run here
    R["skipped"]["vllm"] = f"vllm not importable: {type(e).__name__}"
    print("vllm: not installed here, line skipped", flush=True)
else:
    if fits("scoring", "vllm", 4 * unit_s):
        import tempfile

        from scorer.engines import VllmScorer

        try:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)  # vLLM loads from a folder; no tokenizer needed for token ids
                v = VllmScorer(tmp, max_model_len=4096, dtype="bfloat16" if cuda else "float32")
                bench_scoring("vllm prompt_logprobs", lambda batch: v.score(batch, [1] * len(batch)), est_s=3 * unit_s)
                v.close()
        except Exception as e:  # an engine that cannot start here is a reported line, not a crash
            failed("scoring", "vllm prompt_logprobs", e)
best_c = max((k for k in COMPILED if tps(k)), key=tps, default=None)
if best_c and fits("profile", f"profile {best_c}", 2 * unit_s):
    try:
        profile(best_c, torch_scorer(**{"token_budget": 32 * K, "chunk_size": 8 * K, **COMPILED[best_c]}))
    except Exception as e:
        R.setdefault("profile", {})[best_c] = f"{type(e).__name__}: {str(e)[:300]}"

# ---- roofline and summary -----------------------------------------------------------------------
d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
mean_ctx = sum(x * x for x in lens) / ntok / 2
flops_tok = 2 * (nparams - V * d) + 2 * V * d + 4 * L * d * mean_ctx  # as the anchors count it
R["gflop_per_token"] = round(flops_tok / 1e9, 3)
R["roofline_tok_per_s"] = round(R["matmul_tflops"] * 1e12 / flops_tok)
R["total_s"] = round(time.perf_counter() - T0, 1)
print(f"\nroofline {R['roofline_tok_per_s']} tok/s "
      f"({R['gflop_per_token']} GFLOP/token at {R['matmul_tflops']} TFLOP/s)")
rows = sorted(((k, v) for k, v in R["scoring"].items() if isinstance(v, dict)), key=lambda kv: -kv[1]["tok_per_s"])
for k, v in rows:
    print(f"  {v['tok_per_s']:>9} tok/s  {str(v['peak_GiB']):>6} GiB  x{v.get('vs_naive', 1.0):<5}"
          f"  {v['tok_per_s'] / R['roofline_tok_per_s']:.0%} of roofline  max|d| {v.get('max_abs_diff', 0):.3g}  {k}")
within = [k for k, v in rows if (v["peak_GiB"] or 0) <= 10 and k != "naive_bs8"]
R["fastest_within_10GiB"] = within[0] if within else None
floor = R.get("bf16_noise_floor", {}).get("max_abs_diff", float("nan"))
print(f"noise floor (naive batch 1 vs 8): max|d| {floor:.3g}; "
      f"fastest within 10 GiB: {R['fastest_within_10GiB']}; total {R['total_s']} s; wrote {out_path}")
save()
