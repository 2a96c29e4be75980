"""Reading the offline corpus and turning rows into token ids: pure functions, no engine.

A row is either `prompt` + `response` (strings) or `messages` (a chat list whose last assistant
turn is the response). Optional: `id`, `behavior_logprobs` (one per response token),
`response_ids` (the ids the generator sampled; used as they are). Every other column passes
through. A row that cannot be used raises `RowError(field, reason)` and becomes a reject.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = (".parquet", ".jsonl", ".json")
CONSUMED = ("id", "behavior_logprobs", "response_ids")  # replaced by the output schema


class RowError(Exception):
    """A row that cannot be scored: which field, and why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class Example:
    """One tokenized row, ready to score."""

    id: str
    row: int  # index in its source file
    input_ids: list[int]
    prompt_len: int
    behavior_logprobs: np.ndarray | None  # float32 (T,), or None when the behavior model must score


def list_inputs(data: str) -> list[Path]:
    """A file, a folder (every Parquet/JSONL file under it) or a glob -> sorted file list."""
    p = Path(data)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES]
    else:
        files = [Path(f) for f in glob.glob(data, recursive=True) if Path(f).is_file()]
    files = sorted(f for f in files if f.suffix in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no Parquet or JSONL corpus found at {data!r}")
    return files


def count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def file_schema(path: Path, sample_rows: int = 1000) -> pa.Schema:
    """Arrow schema of a corpus file (JSONL: inferred from its first rows)."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).schema_arrow
    rows = []
    with open(path) as f:
        for line in f:
            if len(rows) >= sample_rows:
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    try:
        return pa.Table.from_pylist(rows).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a column: names only
        names = list(dict.fromkeys(k for r in rows for k in r))
        return pa.schema([(n, pa.null()) for n in names])


def read_rows(path: Path, start: int, stop: int) -> tuple[list[dict | None], pa.Table | None, list[dict]]:
    """Rows [start, stop) of one file as dicts (None for an unreadable line), the Arrow table they
    came from (Parquet only, to keep pass-through column types exact), and read errors."""
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        table = _slice_parquet(pf, start, stop)
        return table.to_pylist(), table, []
    rows: list[dict | None] = []
    errors = []
    with open(path) as f:
        i = 0
        for line in f:
            if not line.strip():
                continue
            if start <= i < stop:
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError("not a JSON object")
                    rows.append(obj)
                except ValueError as e:
                    rows.append(None)
                    errors.append({"row": i, "field": "<line>", "reason": f"unreadable JSON: {e}"})
            i += 1
            if i >= stop:
                break
    return rows, None, errors


def _slice_parquet(pf: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """Read only the row groups that overlap [start, stop)."""
    groups, offset, first = [], 0, None
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table()
    t = pf.read_row_groups(groups)
    return t.slice(start - first, stop - start)


def derive_id(row: dict) -> str:
    """A stable id from the row's content (prompt/response or messages)."""
    key = {k: row.get(k) for k in ("messages", "prompt", "response") if row.get(k) is not None}
    return "sha-" + hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def row_id(row: dict | None, index: int, source: str) -> str:
    if row is None:
        return f"{source}:{index}"
    if row.get("id") is not None:
        return str(row["id"])
    return derive_id(row)


def _prompt_and_response(row: dict) -> tuple[list[dict], str]:
    """(prompt as chat messages, response text) from either row shape."""
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise RowError("messages", "must be a non-empty list of {role, content}")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get("role"):
                raise RowError("messages", "every message needs a role and a string content")
        if messages[-1]["role"] != "assistant":
            raise RowError("messages", f"last message is from {messages[-1]['role']!r}, not the assistant")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]
    prompt, response = row.get("prompt"), row.get("response")
    if prompt is None and response is None:
        raise RowError("prompt", "row has neither prompt+response nor messages")
    if not isinstance(prompt, str):
        raise RowError("prompt", "missing or not a string")
    if not isinstance(response, str) and row.get("response_ids") is None:
        raise RowError("response", "missing or not a string")
    return [{"role": "user", "content": prompt}], response


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """Prompt ids, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer("\n".join(m["content"] for m in prompt))["input_ids"]


def encode_row(row: dict, index: int, source: str, tokenizer, *, max_len: int, truncate: bool,
               append_eos: bool, vocab_size: int) -> Example:
    """Validate and tokenize one row. Raises RowError with the field and reason."""
    prompt, response = _prompt_and_response(row)
    response_ids = row.get("response_ids")
    if response_ids is not None:
        response_ids = [int(x) for x in response_ids]
        if not response_ids:
            raise RowError("response_ids", "empty")
        if isinstance(response, str):
            # The sampled ids are kept as they are (behavior logprobs belong to them) even when
            # the text would tokenize differently; they must still spell this response.
            decoded = tokenizer.decode(response_ids, skip_special_tokens=True)
            if decoded != response:
                at = next((i for i, (a, b) in enumerate(zip(decoded, response)) if a != b), min(len(decoded), len(response)))
                raise RowError("response_ids", f"do not spell the response text: from character {at} they decode to "
                                               f"{decoded[at:at + 30]!r}, the text has {response[at:at + 30]!r}")
    else:
        if not response.strip():
            raise RowError("response", "is empty: no token to score")
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    bad = [t for t in response_ids if not 0 <= t < vocab_size]
    if bad:
        raise RowError("response_ids", f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")

    prompt_ids = encode_prompt(tokenizer, prompt)
    behavior = row.get("behavior_logprobs")
    if behavior is not None:
        behavior = np.asarray(behavior, dtype=np.float64)
        if behavior.ndim != 1 or len(behavior) != len(response_ids):
            raise RowError("behavior_logprobs", f"has {behavior.size} values for {len(response_ids)} response tokens")
        if not np.isfinite(behavior).all():
            raise RowError("behavior_logprobs", f"non-finite value at response token {int(np.argmin(np.isfinite(behavior)))}")
        if (behavior > 1e-4).any():
            raise RowError("behavior_logprobs", f"positive logprob {behavior.max():.4g} (not a log-probability)")
        behavior = behavior.astype(np.float32)

    total = len(prompt_ids) + len(response_ids)
    if total > max_len:
        if not truncate or len(prompt_ids) >= max_len:
            raise RowError("response", f"{total} tokens (prompt {len(prompt_ids)}) exceed max_len {max_len}")
        keep = max_len - len(prompt_ids)
        response_ids = response_ids[:keep]
        behavior = behavior[:keep] if behavior is not None else None
    return Example(id=row_id(row, index, source), row=index, input_ids=prompt_ids + response_ids,
                   prompt_len=len(prompt_ids), behavior_logprobs=behavior)
