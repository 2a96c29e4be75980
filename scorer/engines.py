"""Teacher-forced scoring backends: log p(token | prefix) for the response tokens of each sequence.

Both backends take token ids as they are (never text) and return, for each sequence, a float32
array of the logprobs of `input_ids[prompt_len:]`.

- `TorchScorer`: transformers, the reference. Length-sorted, right-padded batches under a token
  budget, with no attention mask: pads come after every real token, so a causal model needs none
  and the fused attention kernels apply. The vocabulary projection is chunked (no full
  (tokens, vocab) float32 tensor).
- `VllmScorer`: vLLM with `prompt_logprobs=0` on token-id prompts, no detokenization, prefix
  caching off, raw logprobs.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("pear.scorer")


def _vllm_env():
    # In-process engine: faster start, less memory, and weight updates by reference (RL stage).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # vllm missing, or a build that cannot run here
        return False
    return True


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def make_vllm_engine(model: str, max_model_len: int = 4096, skip_tokenizer_init: bool = True,
                     gpu_memory_utilization: float = 0.85, dtype: str | None = None, seed: int = 0):
    """A vLLM engine for scoring or sampling; float32 on CPU (bf16 logprobs of a tiny model drift)."""
    _vllm_env()
    from vllm import LLM

    if dtype is None:
        dtype = "bfloat16" if on_gpu() else "float32"
    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=not on_gpu(),
                  enable_prefix_caching=False, skip_tokenizer_init=skip_tokenizer_init,
                  logprobs_mode="raw_logprobs", seed=seed)
    if on_gpu():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(**kwargs)


def shutdown_vllm(llm) -> None:
    """Stop the engine explicitly: a process holding it and torch models can abort at exit otherwise."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # best effort; the process is about to drop it anyway
        log.debug("vLLM shutdown: %s", e)


class VllmScorer:
    """Response-token logprobs from a vLLM engine's prompt logprobs."""

    name = "vllm"

    def __init__(self, model: str, max_model_len: int = 4096, dtype: str | None = None):
        self.llm = make_vllm_engine(model, max_model_len=max_model_len, dtype=dtype)

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not input_ids:
            return []
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in input_ids], sp, use_tqdm=False)
        result = []
        for ids, p, out in zip(input_ids, prompt_lens, outs):
            plp = out.prompt_logprobs  # one dict per position; position 0 has none
            result.append(np.array([plp[t][ids[t]].logprob for t in range(p, len(ids))], dtype=np.float32))
        return result

    def close(self):
        shutdown_vllm(self.llm)


class TorchScorer:
    """Response-token logprobs from a transformers causal LM (the reference backend)."""

    name = "torch"

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None,
                 token_budget: int = 32768, chunk_size: int = 8192):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        self.token_budget, self.chunk_size = token_budget, chunk_size

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        import torch

        from train.loss import token_logprobs  # one chunked implementation for scoring and training

        body = self.model.get_decoder()
        head = self.model.get_output_embeddings().weight
        result: list[np.ndarray | None] = [None] * len(input_ids)
        with torch.inference_mode():
            for batch in length_sorted_batches([len(x) for x in input_ids], self.token_budget):
                T = max(len(input_ids[i]) for i in batch)
                ids = torch.zeros(len(batch), T, dtype=torch.long)
                for j, i in enumerate(batch):
                    ids[j, : len(input_ids[i])] = torch.tensor(input_ids[i])
                ids = ids.to(self.device, non_blocking=True)
                hidden = body(input_ids=ids).last_hidden_state  # (b, T, D); right pad, causal
                # score only response positions: hidden at t-1 predicts token t
                rows, cols = [], []
                for j, i in enumerate(batch):
                    n = len(input_ids[i])
                    cols.append(torch.arange(prompt_lens[i] - 1, n - 1))
                    rows.append(torch.full((n - prompt_lens[i],), j))
                rows_t, cols_t = torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)
                lp = token_logprobs(hidden[rows_t, cols_t], head, ids[rows_t, cols_t + 1], self.chunk_size)
                lp = lp.cpu().numpy()
                s = 0
                for i in batch:
                    n = len(input_ids[i]) - prompt_lens[i]
                    result[i] = lp[s : s + n]
                    s += n
        return result  # type: ignore[return-value]

    def close(self):
        pass


def length_sorted_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped by length so that (rows x longest row) stays under the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        m = max(longest, lengths[i])
        if cur and m * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        longest = m
    if cur:
        batches.append(cur)
    return batches


def make_scorer(backend: str, model: str, **kwargs):
    if backend == "torch":
        return TorchScorer(model, **{k: v for k, v in kwargs.items() if k in ("device", "dtype", "token_budget", "chunk_size")})
    if backend == "vllm":
        if not vllm_available():
            raise RuntimeError("backend 'vllm' asked for, but vllm is not installed; use --backend torch")
        return VllmScorer(model, **{k: v for k, v in kwargs.items() if k in ("max_model_len", "dtype")})
    raise ValueError(f"backend must be 'torch' or 'vllm', got {backend!r}")
