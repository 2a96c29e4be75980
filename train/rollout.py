"""Rollouts from a vLLM engine held in the trainer's own process, and weight pushes into it.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by `common.vllm_engine`), so new
weights go in by reference through `reload_weights`, with no restart and no file (with worker
processes, passing the tensors fails; the time of a push: bench/RESULTS.md). Prompts and responses
are token ids end to end: the trainer scores exactly the ids the engine sampled.

Sampling logprobs are the engine's raw logprobs (`logprobs_mode="raw_logprobs"`): the log-softmax
of the untempered logits, i.e. the same quantity the trainer computes. Per-request sampling
seeds fail on the CPU build, so randomness comes from the engine seed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError, field
from common.vllm_engine import generate, make_vllm_engine, shutdown_vllm

log = logging.getLogger("pear.rollout")


@dataclass
class Sample:
    """One sampled response: its token ids, the engine's logprob of each, and whether it ended on EOS."""

    token_ids: list[int]
    logprobs: np.ndarray | None  # (T,) float32; None when not asked for
    finished: bool


class RolloutEngine:
    """n samples per token-id prompt, with logprobs; `push_weights` after each optimizer step."""

    def __init__(self, model_dir: str, max_model_len: int, seed: int, gpu_memory_utilization: float = 0.3,
                 cpu_kv_cache_gib: int | None = None):
        # on a GPU the trainer shares the card, so the engine gets a fraction of its memory
        self.llm = make_vllm_engine(str(model_dir), max_model_len=max_model_len, skip_tokenizer_init=True,
                                    gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                    cpu_kv_cache_gib=cpu_kv_cache_gib)
        self.max_model_len = max_model_len

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 top_p: float = 1.0, logprobs: bool = True, bar: str | None = None) -> list[list[Sample]]:
        """For each prompt, n samples (in the engine's order). Without `logprobs` the samples are the
        same and the engine skips gathering them. `bar`: the title of a progress bar over the prompts."""
        from vllm import SamplingParams

        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            logprobs=0 if logprobs else None, detokenize=False)
        outs = generate(self.llm, prompts, sp, bar)
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

    def push_weights(self, model) -> None:
        """Load the trainer's current weights into the running engine (same parameter names as HF)."""
        # the engine's weight loaders copy into its own parameters, so the tensors are not aliased
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(model.state_dict().items())})

    def close(self) -> None:
        shutdown_vllm(self.llm)


# ---- prompts ------------------------------------------------------------------------------------

# The embedded world's task settings (pipelines/world.py builds its corpus with them): the tiny
# models know 1-digit chains of 2-4 terms. A JSON object so that any reasoning-gym task can take
# its own settings.
WORLD_TASK_KWARGS = '{"chain_sum": {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 1}}'
# The RL stage's default reasoning-gym prompt pool (seed and size); evaluation leaves it out too,
# so that a model evaluated before RL and after it is scored on the same held-out prompts.
RL_PROMPT_SEED = 20_000
RL_POOL_SIZE = 512
EVAL_PROMPT_SEED = 30_000


def reasoning_gym_examples(tasks, size: int, seed: int, task_kwargs: str | dict = "") -> list[dict]:
    """`size` reasoning-gym prompts shared over `tasks`; task k uses seed + k (the world's corpus too).

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


# ---- prompt sets: one reader for the RL pool, the evaluation's prompts and its held-out check ----

PIECE_ROWS = 4096  # rows of a prompt set read at a time
# what the held-out check compares: one text per prompt, whatever the file's shape
COMPARED = ("prompt text, whitespace stripped: an evaluation prompt's `prompt` (the last user turn when it is "
            "`messages`) against every training prompt's `prompt` or `question` and every user turn of its "
            "`messages`")


def message_text(content) -> str:
    """A message's text: its content, or the text parts of a list of parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def prompt_sources(spec: str | Path, config: str = "", split: str = "") -> list:
    """The `scorer.sources` sources of a prompt set: a Parquet, JSONL or JSON (array) file, a folder or
    glob of them, a folder saved by `datasets`, or a hub dataset id. A folder with Parquet files at its
    top is those files: a scoring output folder is its shards (not rejects/, not summary.json)."""
    from common.storage import as_path
    from scorer.sources import InputError, open_sources

    spec = str(spec)
    p = as_path(spec)  # a local path or an object-storage URI
    try:
        top = sorted(f for f in p.glob("*.parquet") if not f.name.startswith(".")) if p.is_dir() else []
        if top:
            return [s for f in top for s in open_sources(str(f))]
        if p.suffix in (".parquet", ".jsonl", ".json") and not p.exists() and not any(c in spec for c in "*?["):
            raise FileNotFoundError(f"prompt file not found: {spec}")
        return open_sources(spec, config=config or None, split=split or None)
    except InputError as e:
        raise ValueError(str(e)) from None


def prompt_rows(spec: str | Path, columns: tuple[str, ...], config: str = "",
                split: str = "") -> Iterator[tuple[str, dict]]:
    """Every row of a prompt set as (where, row), read `PIECE_ROWS` rows at a time; `where` names the
    source and row. ValueError for a source with none of `columns`, or a row that is not a JSON object."""
    from scorer.sources import InputError

    try:
        for src in prompt_sources(spec, config, split):
            names = src.schema().names
            if not set(columns) & set(names):
                raise ValueError(f"{src.key}: no {' or '.join(f'`{c}`' for c in columns)} column (it has "
                                 f"{', '.join(names) or 'none'})")
            n = src.num_rows()
            for start in range(0, n, PIECE_ROWS):
                rows, _, errors = src.read(start, min(n, start + PIECE_ROWS))
                if errors:
                    raise ValueError(f"{src.key}: row {errors[0]['row']}: {errors[0]['reason']}")
                for i, row in enumerate(rows, start):
                    yield f"{src.key} row {i}", row
    except InputError as e:  # a JSON array that breaks off, read lazily
        raise ValueError(str(e)) from None


def chat_prompt(messages, where: str) -> list[dict]:
    """A `messages` prompt, checked: a list of {role, content} (null fields dropped, as Parquet gives every
    message every key) with a user turn; a last assistant turn (an SFT row's response) is left out."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else None
        if not m or not isinstance(m.get("role"), str) or not (isinstance(m.get("content"), (str, list, tuple))
                                                               or m.get("tool_calls")):
            raise ValueError(f"{where}: `messages` item {i} needs a role and a string content")
        out.append(m)
    if out[-1]["role"] == "assistant":
        out = out[:-1]
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: `messages` has no user turn to answer")
    return out


def prompt_example(row: dict, where: str, answer_column: str = "answer") -> dict:
    """One prompt row as RL and evaluation use it: the row's columns, `prompt` (the text; with
    `messages`, the last user turn, what the held-out check compares), `messages` when given (the whole
    prompt: system prompt, earlier turns), and `answer` (str) from `answer_column`."""
    ex = dict(row)
    if row.get("messages") is not None:
        ex["messages"] = chat_prompt(row["messages"], where)
        ex["prompt"] = next(message_text(m["content"]) for m in reversed(ex["messages"]) if m["role"] == "user")
    elif not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: needs a string `prompt` or a `messages` chat")
    if row.get(answer_column) is None:
        raise ValueError(f"{where}: no `{answer_column}` (the answer column, --answer-column)")
    ex["answer"] = str(row[answer_column])
    return ex


def read_prompt_file(spec: str, answer_column: str = "answer", config: str = "", split: str = "") -> list[dict]:
    """The rows of a prompt set (see `prompt_sources`), each with `prompt` or `messages` and the answer column."""
    rows = [prompt_example(row, where, answer_column)
            for where, row in prompt_rows(spec, ("prompt", "messages"), config, split)]
    if not rows:
        raise ValueError(f"no prompts in {spec}")
    return rows


def training_prompt_texts(spec: str | Path) -> set[str]:
    """Every prompt text of a training set (a prompt file, SFT corpus or scoring output, any form
    `prompt_sources` reads): `prompt`, else `question`, and every user turn of `messages` (see COMPARED)."""
    texts: set[str] = set()
    for _, row in prompt_rows(spec, ("prompt", "question", "messages")):
        messages = row.get("messages")
        if isinstance(messages, (list, tuple)):
            texts |= {message_text(m.get("content")).strip() for m in messages
                      if isinstance(m, dict) and m.get("role") == "user"}
        text = row.get("prompt") if row.get("prompt") is not None else row.get("question")
        if text is not None:
            texts.add(str(text).strip())
    return texts - {""}


def resolved(spec: str) -> str:
    """What a summary records for a path or hub id: a local path made absolute, a hub id as it is."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


def resolve_aliases(cfg, aliases: dict[str, str]) -> None:
    """Move each alias that was given (other trainers' name for a field: TRL's `num_generations` for
    `samples_per_prompt`) onto its field and clear it, so that a config records one name per setting.
    ValueError when both names are given, with different values."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for alias, name in aliases.items():
        value = getattr(cfg, alias)
        if value is None:
            continue
        current = getattr(cfg, name)
        if current != defaults[name] and current != value:
            raise ValueError(f"--{alias.replace('_', '-')} is another name for --{name.replace('_', '-')}: "
                             f"give one of them (got {value} and {current})")
        setattr(cfg, name, value)
        setattr(cfg, alias, None)


@dataclass
class PromptConfig:
    """Where a stage's prompts come from: reasoning-gym tasks from a seed, or a set of prompts and
    answers (one group, nested in the RL and evaluation configs with their own defaults)."""

    tasks: tuple[str, ...] = field(("chain_sum",), "reasoning-gym task names (the default is the embedded world's)")
    task_kwargs: str = field(WORLD_TASK_KWARGS, "JSON: task name -> reasoning-gym dataset settings (the default is "
                                                "the embedded world's)")
    num_prompts: int = field(RL_POOL_SIZE, "prompts to generate from the tasks")
    prompt_seed: int = field(RL_PROMPT_SEED, f"seed of the generated prompts, task k from seed + k (the world's "
                                             f"ranges: RL {RL_PROMPT_SEED}, evaluation {EVAL_PROMPT_SEED})")
    prompts: str = field("", "prompts and answers instead of reasoning-gym tasks: a Parquet, JSONL or JSON (array) "
                             "file, a folder or glob of them, a `datasets` folder, or a hub dataset "
                             "org/name[@revision]. "
                             "Each row has `prompt` (a string) or `messages` (a chat: system prompt, earlier turns, "
                             "the user's question; a last assistant turn is left out), and the answer column; other "
                             "columns (`task`, `metadata`, ...) reach the reward")
    answer_column: str = field("answer", "the column of --prompts holding each prompt's reference answer")
    prompts_config: str = field("", "hub dataset of --prompts: the configuration name")
    prompts_split: str = field("", "hub dataset or DatasetDict folder of --prompts: the split (hub default: train)")

    FROM_FILE = ("prompts", "answer_column", "prompts_config", "prompts_split")

    def used(self) -> dict:
        """The fields that chose the prompts: those of --prompts when it is given, else the tasks'."""
        from_file = bool(self.prompts)
        return {k: v for k, v in asdict(self).items() if (k in self.FROM_FILE) == from_file}

    def examples(self) -> list[dict]:
        """The prompt rows (prompt, answer, and what the rewards need); ValueError names what is wrong."""
        if self.prompts:
            return read_prompt_file(self.prompts, self.answer_column, self.prompts_config, self.prompts_split)
        from train.rewards import is_reasoning_gym_task

        bad = [t for t in self.tasks if not is_reasoning_gym_task(t)]
        if bad:
            raise ValueError(f"not reasoning-gym tasks: {bad}")
        return reasoning_gym_examples(self.tasks, self.num_prompts, self.prompt_seed, self.task_kwargs)

    def source(self):
        """What a summary records: the prompt set (an absolute path, or a hub id with its config and split),
        or the tasks, seed and size of generated prompts."""
        if self.prompts:
            where = resolved(self.prompts)
            return where + "".join(f":{x}" for x in (self.prompts_config, self.prompts_split) if x) \
                if where == self.prompts else where
        return {"tasks": list(self.tasks), "seed": self.prompt_seed, "size": self.num_prompts}


def prompt_token_ids(tokenizer, prompt: str | dict) -> list[int]:
    """The prompt as the model sees it: the tokenizer's chat template over the conversation, with the
    assistant turn opened. `prompt`: a text (one user turn) or a prompt row (its `messages` when it has
    them, else its `prompt`; its `tools` go to the template). Without a chat template: the turns' texts."""
    import json

    if isinstance(prompt, str):
        messages, tools = [{"role": "user", "content": prompt}], None
    else:
        messages = prompt.get("messages") or [{"role": "user", "content": prompt["prompt"]}]
        tools = prompt.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
    if getattr(tokenizer, "chat_template", None):
        try:
            return list(tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                      tokenize=True, return_dict=False))
        except Exception as e:  # jinja raises whatever the template author chose
            raise ConfigError(f"prompt {message_text(messages[-1]['content'])[:40]!r}: the chat template cannot "
                              f"render it ({type(e).__name__}: {e})") from None
    return list(tokenizer("\n".join(message_text(m["content"]) for m in messages))["input_ids"])
