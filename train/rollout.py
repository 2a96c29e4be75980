"""Rollouts from a vLLM engine held in the trainer's own process, and weight pushes into it.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by `scorer.engines`), so new
weights go in by reference through `reload_weights`, with no restart and no file (0.01 s on the
tiny model; with worker processes passing tensors fails, see ENV-NOTES). Prompts and responses
are token ids end to end: the trainer scores exactly the ids the engine sampled.

Sampling logprobs are the engine's raw logprobs (`logprobs_mode="raw_logprobs"`): the log-softmax
of the untempered logits, i.e. the same quantity the trainer computes. Per-request sampling
seeds fail on the CPU build, so randomness comes from the engine seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from scorer.config import field
from scorer.engines import make_vllm_engine, shutdown_vllm

log = logging.getLogger("pear.rollout")


@dataclass
class Sample:
    """One sampled response: its token ids, the engine's logprob of each, and whether it ended on EOS."""

    token_ids: list[int]
    logprobs: np.ndarray | None  # (T,) float32; None when not asked for
    finished: bool


class RolloutEngine:
    """n samples per token-id prompt, with logprobs; `push_weights` after each optimizer step."""

    def __init__(self, model_dir: str, max_model_len: int, seed: int, gpu_memory_utilization: float = 0.3):
        # on a GPU the trainer shares the card, so the engine gets a fraction of its memory
        self.llm = make_vllm_engine(str(model_dir), max_model_len=max_model_len, skip_tokenizer_init=True,
                                    gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.max_model_len = max_model_len

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 top_p: float = 1.0, logprobs: bool = True) -> list[list[Sample]]:
        """For each prompt, n samples (in the engine's order). Without `logprobs` the samples are the
        same and the engine skips gathering them (on the CPU that gather is compiled on first use)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            logprobs=0 if logprobs else None, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = (np.array([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)], dtype=np.float32)
                       if logprobs else None)
                group.append(Sample(ids, lps, c.finish_reason == "stop"))
            result.append(group)
        return result

    def score(self, input_ids: list[list[int]], prompt_lens: list[int]) -> list[np.ndarray]:
        """Teacher-forced logprobs of `input_ids[prompt_len:]` under the engine's current weights."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in input_ids], sp, use_tqdm=False)
        return [np.array([out.prompt_logprobs[t][ids[t]].logprob for t in range(p, len(ids))], dtype=np.float32)
                for ids, p, out in zip(input_ids, prompt_lens, outs)]

    def push_weights(self, model) -> None:
        """Load the trainer's current weights into the running engine (same parameter names as HF)."""
        # the engine's weight loaders copy into its own parameters, so the tensors are not aliased
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(model.state_dict().items())})

    def close(self) -> None:
        shutdown_vllm(self.llm)


# ---- prompts ------------------------------------------------------------------------------------

# The embedded world's task settings (as in pipelines/world.py): the tiny models know 1-digit
# chains of 2-4 terms. A JSON object so that any reasoning-gym task can take its own settings.
WORLD_TASK_KWARGS = '{"chain_sum": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 1}}'
# The RL stage's default reasoning-gym prompt pool (seed and size); evaluation leaves it out too,
# so that a model evaluated before RL and after it is scored on the same held-out prompts.
RL_PROMPT_SEED = 20_000
RL_POOL_SIZE = 512
EVAL_PROMPT_SEED = 30_000


def reasoning_gym_examples(tasks, size: int, seed: int, task_kwargs: str | dict = "") -> list[dict]:
    """`size` reasoning-gym prompts shared over `tasks`; task k uses seed + k (as the world does).

    Rows: prompt (= question), answer, task, metadata: what the rewards need.
    """
    import json

    import reasoning_gym as rg

    kwargs = json.loads(task_kwargs) if isinstance(task_kwargs, str) and task_kwargs else (task_kwargs or {})
    rows, per = [], max(1, size // len(tasks))
    for k, name in enumerate(tasks):
        ds = rg.create_dataset(name, size=per, seed=seed + k, **kwargs.get(name, {}))
        for i in range(per):
            e = ds[i]
            rows.append({"prompt": e["question"], "question": e["question"], "answer": str(e["answer"]),
                         "task": name, "metadata": e["metadata"]})
    return rows


def read_prompt_file(path: str) -> list[dict]:
    """Rows of a Parquet file/folder/glob or a JSONL file with `prompt` and `answer` (other columns kept)."""
    import json
    from pathlib import Path

    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        if not p.exists():
            raise FileNotFoundError(f"prompt file not found: {path}")
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    else:
        import polars as pl

        files = sorted(p.glob("*.parquet")) if p.is_dir() else sorted(p.parent.glob(p.name))
        if not files:
            raise FileNotFoundError(f"prompt file not found: {path}")
        rows = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").to_dicts()
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str) or r.get("answer") is None:
            raise ValueError(f"{path}: row {i} needs a string `prompt` and an `answer`")
        r["answer"] = str(r["answer"])
    return rows


@dataclass
class PromptConfig:
    """Where a stage's prompts come from: reasoning-gym tasks from a seed, or a file of prompts and
    answers (one group, nested in the RL and evaluation configs with their own defaults)."""

    tasks: tuple[str, ...] = field(("chain_sum",), "reasoning-gym task names")
    task_kwargs: str = field(WORLD_TASK_KWARGS, "JSON: task name -> reasoning-gym dataset settings")
    num_prompts: int = field(RL_POOL_SIZE, "prompts to generate from the tasks")
    prompt_seed: int = field(RL_PROMPT_SEED, f"seed of the generated prompts, task k from seed + k (the world's "
                                             f"ranges: RL {RL_PROMPT_SEED}, evaluation {EVAL_PROMPT_SEED})")
    prompts: str = field("", "Parquet/JSONL with `prompt` and `answer` (optional `task`, `metadata`) instead "
                             "of reasoning-gym tasks")

    def examples(self) -> list[dict]:
        """The prompt rows (prompt, answer, and what the rewards need); ValueError names what is wrong."""
        if self.prompts:
            return read_prompt_file(self.prompts)
        from train.rewards import is_reasoning_gym_task

        bad = [t for t in self.tasks if not is_reasoning_gym_task(t)]
        if bad:
            raise ValueError(f"not reasoning-gym tasks: {bad}")
        return reasoning_gym_examples(self.tasks, self.num_prompts, self.prompt_seed, self.task_kwargs)


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the model sees it: the tokenizer's chat template (with the assistant turn opened)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer(text)["input_ids"])
