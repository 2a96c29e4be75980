"""Teacher-forced scoring backends: log p(token | prefix) for the response tokens of each sequence.

Both backends take token ids as they are (never text) and return, for each sequence, a float32
array of the logprobs of `input_ids[prompt_len:]`.

- `TorchScorer`: transformers, the reference. Length-sorted, right-padded batches under a token
  budget, with no attention mask: pads come after every real token, so a causal model needs none
  and the fused attention kernels apply (or, as an option, packed rows with attention inside each
  sequence). The vocabulary projection is chunked (no full (tokens, vocab) float32 tensor):
  `token_logprobs`, which the trainers use too (train/loss.py).
- `VllmScorer`: vLLM with `prompt_logprobs=0` on token-id prompts, no detokenization, prefix
  caching off, raw logprobs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Protocol

import numpy as np

from common.batching import length_sorted_batches, packed_batches
from common.vllm_engine import generate, make_vllm_engine, shutdown_vllm, vllm_available


def prompt_logprobs(llm, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
    """Teacher-forced logprobs of `input_ids[prompt_len:]` under a vLLM engine's current weights
    (its prompt logprobs); any engine, the scorer's or the RL stage's rollout engine."""
    from vllm import SamplingParams

    if not input_ids:
        return []
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    outs = generate(llm, input_ids, sp)
    result = []
    for ids, p, out in zip(input_ids, prompt_lens, outs):
        plp = out.prompt_logprobs  # one dict per position; position 0 has none
        result.append(np.array([plp[t][ids[t]].logprob for t in range(p, len(ids))], dtype=np.float32))
    return result


class VllmScorer:
    """Response-token logprobs from a vLLM engine's prompt logprobs."""

    name = "vllm"

    def __init__(self, model: str, max_model_len: int = 4096, dtype: str | None = None):
        self.llm = make_vllm_engine(model, max_model_len=max_model_len, dtype=dtype)

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        return prompt_logprobs(self.llm, input_ids, prompt_lens)

    def close(self):
        shutdown_vllm(self.llm)


class TorchScorer:
    """Response-token logprobs from a transformers causal LM (the reference backend).

    Sequences go in batches of at most `token_budget` tokens; only the hidden states that predict
    response tokens go through the vocabulary projection, `chunk_size` rows at a time. Each batch's
    logprobs stay on the device until one transfer at the end, so the host never waits per batch.

    Options (each one a variant measured by `bench/gpu_bench.py`; the defaults are the reference):
    - `attention="padded"`: length-sorted, right-padded batches (rows x longest <= token_budget) and
      no attention mask: pads come after every real token, so causal attention needs none and SDPA's
      fused kernels apply. `"packed"`: the sequences of a batch concatenated into one row, positions
      restarting at each sequence, attention inside each sequence only (varlen flash attention on
      CUDA, one SDPA call per sequence elsewhere): no pad token is computed.
    - `upcast_logits=True`: each chunk of logits is cast to float32 before the softmax. False: the
      max and exp run in the model's dtype and only the sum in float32, which moves less memory; in
      bf16 the logprobs then differ by about the bf16 rounding of the logits.
    - `compile=True`: torch.compile each decoder layer (in place, on the model) and the chunk function.
    """

    name = "torch"

    def __init__(self, model, device: str | None = None, dtype: str | None = None,
                 token_budget: int | None = None, chunk_size: int = 8192, attention: str | None = None,
                 upcast_logits: bool = True, compile: bool | None = None):
        """`model`: a path, loaded on `device` in `dtype`; or a loaded causal LM, used where it is.

        Unset options take the fastest measured settings for the device (bench/RESULTS.md, "GPU:
        scoring"): on a GPU packed attention, compiled layers and 64k-token batches; on the CPU
        padded eager batches of 32k tokens (compiling costs more than it saves on small CPU jobs).
        """
        import torch
        from transformers import AutoModelForCausalLM

        gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") \
            if isinstance(model, str) \
            else next(model.parameters()).is_cuda
        attention = attention or ("packed" if gpu else "padded")
        compile = gpu if compile is None else compile
        token_budget = token_budget or (65536 if gpu else 32768)
        if attention not in ("padded", "packed"):
            raise ValueError(f"attention must be 'padded' or 'packed', got {attention!r}")
        if isinstance(model, str):
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = (getattr(torch, dtype) if dtype
                           else (torch.bfloat16 if self.device == "cuda" else torch.float32))
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        else:
            self.model = model.eval()
            self.device = next(model.parameters()).device
        self.token_budget, self.chunk_size, self.attention = token_budget, chunk_size, attention
        self._chunk_logprobs = _logprobs_upcast if upcast_logits else _logprobs_native
        if compile:
            # one compiled graph serves every layer (same code, same shapes); dynamic: batches vary
            decoder = self.model.get_decoder()
            for layer in getattr(decoder, "layers", [decoder]):
                layer.compile(dynamic=True)
            self._chunk_logprobs = torch.compile(self._chunk_logprobs, dynamic=True)

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        import torch

        lengths = [len(x) for x in input_ids]
        packed = self.attention == "packed"
        batches = (packed_batches if packed else length_sorted_batches)(lengths, self.token_budget)
        head = self.model.get_output_embeddings().weight  # (V, D)
        pieces = []  # per batch, its response logprobs in batch order, left on the device
        with torch.inference_mode(), (packed_attention(self.model) if packed else contextlib.nullcontext()):
            for batch in batches:
                hidden, ids, starts = self._forward([input_ids[i] for i in batch])  # (M, D), (M,)
                # only response positions: the hidden state at t-1 predicts token t
                pos = torch.cat([torch.arange(s + prompt_lens[i] - 1, s + lengths[i] - 1)
                                 for s, i in zip(starts, batch)])
                pos = pos.to(self.device, non_blocking=True)  # (N,)
                labels = ids[pos + 1]  # (N,)
                pieces.append(token_logprobs(hidden, head, labels, self.chunk_size, positions=pos,
                                             chunk_logprobs=self._chunk_logprobs))
        flat = torch.cat(pieces).cpu().numpy() if pieces else np.zeros(0, np.float32)
        result: list[np.ndarray | None] = [None] * len(input_ids)
        s = 0
        for i in (i for batch in batches for i in batch):
            n = lengths[i] - prompt_lens[i]
            result[i] = flat[s : s + n]
            s += n
        return result  # type: ignore[return-value]

    def _forward(self, seqs: list[list[int]]):
        """Last hidden states of one batch, flattened: (M, D), the (M,) token ids, each sequence's first row."""
        import torch

        body = self.model.get_decoder()
        lens = [len(x) for x in seqs]
        if self.attention == "packed":
            ids = torch.cat([torch.as_tensor(x, dtype=torch.long) for x in seqs])  # (M,)
            position_ids = torch.cat([torch.arange(n) for n in lens])  # (M,), restarting per sequence
            cu_seq_lens = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)  # (S+1,) boundaries
            ids, position_ids, cu_seq_lens = (t.to(self.device, non_blocking=True)
                                              for t in (ids, position_ids, cu_seq_lens))
            hidden = body(input_ids=ids[None], position_ids=position_ids[None], use_cache=False,
                          cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                          max_length_q=max(lens), max_length_k=max(lens)).last_hidden_state[0]  # (M, D)
            return hidden, ids, np.cumsum([0] + lens[:-1]).tolist()
        T = max(lens)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)  # (b, T), right-padded
        for j, x in enumerate(seqs):
            ids[j, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        ids = ids.to(self.device, non_blocking=True)
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # (b, T, D); causal, no mask
        return hidden.flatten(0, 1), ids.flatten(), [j * T for j in range(len(seqs))]

    def close(self):
        """Drop the model (its memory goes back, on the GPU too, once nothing else holds it)."""
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _logprobs_upcast(hidden, weight, labels):  # (n, D), (V, D), (n,) -> (n,) float32
    """log p(label | hidden): the logits in float32, then cross-entropy (the reference)."""
    import torch.nn.functional as F

    logits = (hidden @ weight.T).float()  # (n, V)
    return -F.cross_entropy(logits, labels, reduction="none")


def _logprobs_native(hidden, weight, labels):  # (n, D), (V, D), (n,) -> (n,) float32
    """log p(label | hidden) from model-dtype logits: max and exp in that dtype, sum and log in float32."""
    import torch

    logits = hidden @ weight.T  # (n, V)
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    sumexp = torch.sub(logits, top).exp_().sum(-1, dtype=torch.float32)  # (n,)
    return logits.gather(-1, labels[:, None])[:, 0].float() - top[:, 0].float() - sumexp.log()


def token_logprobs(
    hidden,  # (M, D) hidden states
    lm_head_weight,  # (V, D)
    labels,  # (N,) token ids
    chunk_size: int = 4096,
    positions=None,  # (N,) long: the rows of `hidden` that predict `labels`; None: its first N rows
    chunk_logprobs: Callable = _logprobs_upcast,  # (n, D), (V, D), (n,) -> (n,) float32
):  # -> (N,) float32
    """log p(label | hidden) for N positions, `chunk_size` at a time, so that no (N, V) float32 tensor
    is ever held: each chunk's logits are reduced to the labels' logprobs and dropped. The torch
    scorer and the trainers (train/loss.py) both compute their logprobs here.

    `positions` rows are gathered a chunk at a time (no (N, D) copy). Under autograd each chunk is
    checkpointed: its logits are computed again in backward instead of kept.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    out = []
    for s in range(0, labels.shape[0], chunk_size):
        h = hidden[s : s + chunk_size] if positions is None else hidden[positions[s : s + chunk_size]]  # (n, D)
        y = labels[s : s + chunk_size]  # (n,)
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            out.append(checkpoint(chunk_logprobs, h, lm_head_weight, y, use_reentrant=False))
        else:
            out.append(chunk_logprobs(h, lm_head_weight, y))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


_PACKED = "pear_packed"  # the name packed attention is registered under in transformers


@contextlib.contextmanager
def packed_attention(model):
    """Within the block the model's attention is `_packed_attention`; the model's own comes back after.

    Its forward then needs `position_ids` and `cu_seq_lens_q/k`, `max_length_q/k` (transformers
    passes these keyword arguments down to the attention function).
    """
    _register_packed_attention()
    before = model.config._attn_implementation
    model.config._attn_implementation = _PACKED
    try:
        yield
    finally:
        model.config._attn_implementation = before


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      cu_seq_lens_q=None, max_length_q=None, varlen=None, per_sequence=None, **kwargs):
    """Causal attention inside each sequence of one packed row (transformers' attention contract).

    query (1, H, M, d), key and value (1, Hkv, M, d), `cu_seq_lens_q` (S+1,) int32 sequence boundaries
    -> ((1, M, H, d), None). No mask: transformers builds none for an attention it does not know.
    `varlen` and `per_sequence` are bound by `_register_packed_attention`.
    """
    if cu_seq_lens_q is None:
        raise ValueError("packed attention needs cu_seq_lens_q and max_length_q in the forward call")
    if varlen is None or not query.is_cuda:
        return per_sequence(query, key, value, cu_seq_lens_q, scaling), None
    fn, kw, gqa, has_scale = varlen
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (M, H, d), last dim contiguous
    if k.shape[1] != q.shape[1] and not gqa:  # this torch's varlen_attn wants as many kv heads as q heads
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if has_scale:
        kw = {**kw, "scale": scaling}
    out = fn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **kw)  # (M, H, d)
    return out[None], None


def _sdpa_per_sequence(query, key, value, cu_seq_lens, scaling):
    """The fallback (CPU, or no varlen_attn): one causal SDPA call per sequence -> (1, M, H, d)."""
    import torch
    import torch.nn.functional as F

    bounds = cu_seq_lens.tolist()
    gqa = key.shape[1] != query.shape[1]
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                    is_causal=True, scale=scaling, enable_gqa=gqa)
                     for a, b in zip(bounds[:-1], bounds[1:])], dim=2)  # (1, H, M, d)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _register_packed_attention():
    """Register `_packed_attention` once per process: torch.compile guards on the function's identity.

    It is bound to this torch's varlen_attn, whose signature moved between releases (is_causal, then
    window_size, then enable_gqa), as (varlen_attn, causal kwargs, takes GQA, takes scale) or None.
    """
    import torch
    from transformers import AttentionInterface

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen = None
    else:
        params = inspect.signature(varlen_attn).parameters
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        gqa = "enable_gqa" in params
        if gqa:
            kw["enable_gqa"] = True
        varlen = (varlen_attn, kw, gqa, "scale" in params)
    # the fallback's Python loop over sequences stays out of compiled graphs (it would recompile per batch)
    per_sequence = torch.compiler.disable(_sdpa_per_sequence)
    AttentionInterface.register(_PACKED, functools.partial(_packed_attention, varlen=varlen, per_sequence=per_sequence))


class Scorer(Protocol):
    """What the scoring job needs of a backend."""

    name: str

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        """float32 logprobs of `input_ids[i][prompt_lens[i]:]` under the model, one array per sequence."""

    def close(self) -> None:
        """Release the model and its memory."""


def _torch_scorer(model: str, **kw) -> Scorer:
    keys = ("device", "dtype", "token_budget", "chunk_size", "attention", "compile")
    return TorchScorer(model, **{k: v for k, v in kw.items() if k in keys and v is not None})


def _vllm_scorer(model: str, **kw) -> Scorer:
    if not vllm_available():
        raise RuntimeError("backend 'vllm' asked for, but vllm is not installed; use --backend torch")
    return VllmScorer(model, **{k: v for k, v in kw.items() if k in ("max_model_len", "dtype")})


# every scoring backend, by the name `--backend` takes; a new one is a class and a line here
BACKENDS: dict[str, Callable[..., Scorer]] = {"torch": _torch_scorer, "vllm": _vllm_scorer}


def make_scorer(backend: str, model: str, **kwargs) -> Scorer:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](model, **kwargs)
