"""A vLLM engine in this process, as the scorer (prompt logprobs) and the RL stage (rollouts) start it.

vLLM is imported only when an engine starts: the CPU and GPU builds provide the same module, and
an environment without either still imports this.
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("pear.vllm")


def _vllm_env():
    # In-process engine: faster start, less memory, and weight updates by reference (RL stage).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # ERROR: with skip_tokenizer_init, vLLM's start-up warm-up logs a harmless chat-template
    # traceback at WARNING level on every engine start
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


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
                     gpu_memory_utilization: float = 0.85, dtype: str | None = None, seed: int = 0,
                     cpu_kv_cache_gib: int | None = None):
    """A vLLM engine for scoring or sampling; float32 on CPU (bf16 logprobs of a tiny model drift).
    `cpu_kv_cache_gib`: the KV cache on the CPU (VLLM_CPU_KVCACHE_SPACE, read as the engine starts);
    None: the environment's, 1 GiB unless set."""
    _vllm_env()
    from vllm import LLM

    if dtype is None:
        dtype = "bfloat16" if on_gpu() else "float32"
    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=not on_gpu(),
                  enable_prefix_caching=False, skip_tokenizer_init=skip_tokenizer_init,
                  logprobs_mode="raw_logprobs", seed=seed)
    if on_gpu():
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if cpu_kv_cache_gib is None or on_gpu():
        return LLM(**kwargs)
    before = os.environ["VLLM_CPU_KVCACHE_SPACE"]  # this engine's only: later ones get the environment's
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gib))
    try:
        return LLM(**kwargs)
    finally:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = before


def generate(llm, prompts: list[list[int]], params, bar: str | None = None) -> list:
    """`llm.generate` on token-id prompts, one output per prompt in order; with `bar` (its title), a
    progress bar over the prompts on the terminal (`prompt_bar`), else none.

    On the CPU, with torch.compile off for the call: vLLM compiles the rank count behind returned
    logprobs (`batched_count_greater_than`) on first use in each process, 2 s with inductor's cache
    warm and 9 s with it empty (a C++ build), for a comparison and a sum that run as fast eagerly
    at a CPU engine's sizes; the samples and logprobs are the same. On a GPU vLLM compiles as usual."""
    import torch
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    with contextlib.nullcontext() if on_gpu() else torch.compiler.set_stance("force_eager"):
        return llm.generate(requests, params, use_tqdm=prompt_bar(bar, len(prompts)) if bar else False)


def prompt_bar(title: str, total: int):
    """vLLM's progress-bar factory (`use_tqdm=`) for a bar like the other stages': over prompts, on the
    terminal's stderr. vLLM calls `update` once per finished prompt with its count of samples, and
    sets its own speed postfix; the bar counts the prompt and leaves the postfix out. vLLM also wraps
    its prompts in the factory while it renders them (an instant for token ids): no bar there."""
    from tqdm import tqdm

    from common import console

    class PromptBar(tqdm):
        postfix = property(lambda self: None, lambda self, value: None)

        def update(self, n=1):
            return super().update(1)

    def make(iterable=None, **_):
        return iterable if iterable is not None else PromptBar(total=total, desc=title, unit="prompt",
                                                               file=console.err())

    return make


def shutdown_vllm(llm) -> None:
    """Stop the engine explicitly: a process holding it and torch models can abort at exit otherwise."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # best effort; the process is about to drop it anyway
        log.debug("vLLM shutdown: %s", e)
