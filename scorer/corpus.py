"""Reading the offline corpus and turning rows into token ids: pure functions, no engine.

A row is either `prompt` + `response` (strings), `messages` (a chat list; `tools` optional) or
ShareGPT's `conversations` (a list of `{from, value}`, read as `messages`). Through the target's
chat template, the whole conversation becomes one sequence of ids and every assistant turn a
span of scored tokens; system, user and tool turns are context. Optional: `id`,
`behavior_logprobs` (one per scored token, all spans in order), `response_ids` (the ids the
generator sampled for the last assistant turn; used as they are). Every other column passes
through. A row that cannot be used raises `RowError(field, reason)` and becomes a reject.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

CONSUMED = ("id", "behavior_logprobs", "response_ids")  # replaced by the output schema
# read to build the ids (and passed through)
INPUT_COLUMNS = ("prompt", "response", "messages", "conversations", "tools")
# ShareGPT's speakers (`from`) as chat roles; any other speaker is passed on as its role
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool"}
# roles the common chat templates know; others are passed to the template, and counted
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


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
    spans: list[tuple[int, int]]  # [start, end) token positions of each assistant turn, in order
    behavior_logprobs: np.ndarray | None  # float32, one per span token, or None when the behavior model must score

    @property
    def prompt_len(self) -> int:
        """Tokens before the first span: context only."""
        return self.spans[0][0]

    @property
    def response_positions(self) -> np.ndarray:
        """Positions of the scored tokens, in order (int64)."""
        return np.concatenate([np.arange(s, e) for s, e in self.spans])


def derive_id(row: dict) -> str:
    """A stable id from the row's content (prompt/response or messages)."""
    key = {k: row.get(k) for k in ("messages", "conversations", "prompt", "response") if row.get(k) is not None}
    return "sha-" + hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def row_id(row: dict | None, index: int, source: str) -> str:
    if row is None:
        return f"{source}:{index}"
    if row.get("id") is not None:
        return str(row["id"])
    return derive_id(row)


def columns_problem(names) -> str | None:
    """Why a corpus with these columns has no row shape the scorer reads (None when it has one)."""
    names = set(names)
    if "messages" in names or "conversations" in names or ("prompt" in names and names & {"response", "response_ids"}):
        return None
    found = ", ".join(sorted(names)) or "none"
    return (f"has neither prompt+response nor messages (columns found: {found}); expected prompt + response "
            "(strings), messages (a list of {role, content}) or ShareGPT's conversations (a list of {from, value})")


def _sharegpt(turns) -> list[dict]:
    """ShareGPT's `conversations` ({from, value} per turn) as chat messages."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RowError("conversations", "must be a non-empty list of {from, value}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise RowError("conversations", f"turn {i}: every turn needs a string from and a string value")
        out.append({"role": SHAREGPT_ROLES.get(t["from"].lower(), t["from"]), "content": t["value"]})
    return out


def _is_empty(content) -> bool:
    """No content: a blank string, or a list of content parts that are all text parts without text."""
    if isinstance(content, str):
        return not content.strip()
    return all(isinstance(p, dict) and p.get("type", "text") == "text" and not str(p.get("text") or "").strip()
               for p in content)


def _message_list(row: dict, column: str = "messages") -> list[dict]:
    """The row's chat, checked, with null fields dropped (Parquet gives every message every key).

    An assistant turn with no content and no tool call is refused as an empty `response` is: the
    template would still add its end-of-turn token, and that lone token would be trained."""
    messages = row.get("messages") if column == "messages" else _sharegpt(row.get(column))
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RowError(column, f"message {i}: every message needs a role and a string content")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("content"), (str, list)) and not m.get("tool_calls"):
            raise RowError(column, f"message {i} ({m['role']}): every message needs a role and a string content")
        if m["role"] == "assistant" and not m.get("tool_calls") and _is_empty(m.get("content", "")):
            raise RowError(column, f"message {i} (assistant) is empty: no token to score")
        out.append(m)
    return out


def _conversation(row: dict) -> list[dict]:
    """Every row shape as a chat: `messages`, ShareGPT's `conversations`, or `prompt` + `response` as one
    user and one assistant turn."""
    if row.get("messages") is not None:
        return _message_list(row)
    if row.get("conversations") is not None:
        return _message_list(row, "conversations")
    prompt, response = row.get("prompt"), row.get("response")
    if prompt is None and response is None:
        raise RowError("prompt", "row has neither prompt+response nor messages")
    if not isinstance(prompt, str):
        raise RowError("prompt", "missing or not a string")
    if row.get("response_ids") is None and (not isinstance(response, str) or not response.strip()):
        raise RowError("response", "missing, empty or not a string: no token to score")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def unknown_roles(row: dict) -> int:
    """Messages of a row whose role the common chat templates do not know (not in KNOWN_ROLES)."""
    if row.get("messages") is not None:
        messages = row["messages"]
    else:
        turns = row.get("conversations") or []
        messages = [{"role": SHAREGPT_ROLES.get(t["from"].lower(), t["from"])} for t in turns
                    if isinstance(t, dict) and isinstance(t.get("from"), str)]
    return sum(1 for m in messages or [] if isinstance(m, dict) and m.get("role") not in KNOWN_ROLES)


def _tools(row: dict):
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError("tools", f"not valid JSON: {e}") from None
    return tools or None


def render(tokenizer, messages: list[dict], tools=None, **kw) -> str:
    """The chat template's text; a template that refuses the conversation rejects the row."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kw)
    except Exception as e:  # jinja raises whatever the template author chose
        raise RowError("messages", f"the chat template cannot render it ({type(e).__name__}: {e})") from None


def assistant_char_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as the template writes it, and the character span of every assistant turn.

    A turn's span starts where the template's generation prompt for it ends (rendering the turns
    before it with `add_generation_prompt=True`) and ends where the conversation up to and including
    it ends, trailing whitespace excluded: the content and the template's end-of-turn marker.
    Templates that do not render earlier turns as a prefix of the whole (some drop earlier
    reasoning) cannot be cut into spans this way; such a row is rejected, by name.
    """
    full = render(tokenizer, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], tools).rstrip()
        if not (full.startswith(before) and full.startswith(upto)):
            raise RowError("messages", f"the chat template renders the conversation up to turn {i} differently "
                                       "from the whole conversation; its assistant turns cannot be located")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    if not spans:
        raise RowError("messages", "no assistant turn: nothing to score")
    return full, spans


def tokenize_spans(tokenizer, text: str, char_spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (as the template's own tokenization gives them) and the token spans that
    fall inside `char_spans` (a token belongs to the span its first character is in)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
        inside = [any(s <= a < e for s, e in char_spans) for a in starts]
    else:  # no offsets: tokenize context and spans piece by piece
        ids, inside, cut = [], [], 0
        for s, e in char_spans + [(len(text), len(text))]:
            for piece, flag in ((text[cut:s], False), (text[s:e], True)):
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids += piece_ids
                inside += [flag] * len(piece_ids)
            cut = e
    spans, t = [], 0
    while t < len(ids):
        if inside[t]:
            s = t
            while t < len(ids) and inside[t]:
                t += 1
            spans.append((s, t))
        else:
            t += 1
    return ids, spans


def encode_prompt(tokenizer, prompt: list[dict], tools=None) -> list[int]:
    """Prompt ids, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        text = render(tokenizer, prompt, tools, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in prompt))["input_ids"]


def _sampled_response(row: dict, conversation: list[dict], tokenizer) -> list[int]:
    """The generator's own ids for the last assistant turn (`response_ids`), checked against its text."""
    if conversation[-1]["role"] != "assistant":
        raise RowError("messages", f"last message is from {conversation[-1]['role']!r}, not the assistant "
                                   "(response_ids belong to the last assistant turn)")
    try:
        response_ids = [int(x) for x in row["response_ids"]]
    except (TypeError, ValueError):
        raise RowError("response_ids", "must be a list of integers") from None
    if not response_ids:
        raise RowError("response_ids", "empty")
    response = conversation[-1].get("content")
    if isinstance(response, str):
        # The sampled ids are kept as they are (behavior logprobs belong to them) even when the
        # text would tokenize differently; they must still spell this response.
        decoded = tokenizer.decode(response_ids, skip_special_tokens=True)
        if decoded != response:
            at = next((i for i, (a, b) in enumerate(zip(decoded, response)) if a != b),
                      min(len(decoded), len(response)))
            raise RowError("response_ids", f"do not spell the response text: from character {at} they decode to "
                                           f"{decoded[at:at + 30]!r}, the text has {response[at:at + 30]!r}")
    return response_ids


def encode_row(row: dict, index: int, source: str, tokenizer, *, max_len: int, truncate: bool,
               append_eos: bool, vocab_size: int) -> Example:
    """Validate and tokenize one row. Raises RowError with the field and reason.

    Three ways, in this order: `response_ids` (the generator's sampled ids after the templated
    prompt, as they are); a tokenizer with a chat template (the whole conversation through the
    template, every assistant turn a span); a tokenizer without one (prompt text, then the response
    text closed with EOS when `append_eos`; a single assistant turn only).
    """
    conversation = _conversation(row)
    tools = _tools(row)
    if row.get("response_ids") is not None:
        response_ids = _sampled_response(row, conversation, tokenizer)
        prompt_ids = encode_prompt(tokenizer, conversation[:-1], tools)
        input_ids, spans = prompt_ids + response_ids, [(len(prompt_ids), len(prompt_ids) + len(response_ids))]
    elif getattr(tokenizer, "chat_template", None):
        text, char_spans = assistant_char_spans(tokenizer, conversation, tools)
        input_ids, spans = tokenize_spans(tokenizer, text, char_spans)
        if not spans:
            raise RowError("messages", "the assistant turns hold no token to score")
    else:
        if sum(m["role"] == "assistant" for m in conversation) != 1 or conversation[-1]["role"] != "assistant":
            raise RowError("messages", "the tokenizer has no chat template: only one assistant turn, the last, "
                                       "can be scored")
        response = conversation[-1].get("content")
        if not isinstance(response, str) or not response.strip():
            raise RowError("response", "is empty: no token to score")
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        prompt_ids = encode_prompt(tokenizer, conversation[:-1])
        input_ids, spans = prompt_ids + response_ids, [(len(prompt_ids), len(prompt_ids) + len(response_ids))]
    bad = [t for t in input_ids if not 0 <= t < vocab_size]
    if bad:
        raise RowError("response_ids", f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}")
    if spans[0][0] < 1:
        raise RowError("messages", "the first scored token needs a token before it (an empty prompt)")
    n_response = sum(e - s for s, e in spans)

    behavior = row.get("behavior_logprobs")
    if behavior is not None:
        behavior = np.asarray(behavior, dtype=np.float64)
        if behavior.ndim != 1 or len(behavior) != n_response:
            raise RowError("behavior_logprobs", f"has {behavior.size} values for {n_response} response tokens")
        if not np.isfinite(behavior).all():
            raise RowError("behavior_logprobs",
                           f"non-finite value at response token {int(np.argmin(np.isfinite(behavior)))}")
        if (behavior > 1e-4).any():
            raise RowError("behavior_logprobs", f"positive logprob {behavior.max():.4g} (not a log-probability)")
        behavior = behavior.astype(np.float32)

    if len(input_ids) > max_len:
        if not truncate or spans[0][0] >= max_len:
            field = "messages" if row.get("messages") is not None else "response"
            raise RowError(field, f"{len(input_ids)} tokens (prompt {spans[0][0]}) exceed max_len {max_len}")
        input_ids = input_ids[:max_len]
        spans = [(s, min(e, max_len)) for s, e in spans if s < max_len]
        if behavior is not None:
            behavior = behavior[: sum(e - s for s, e in spans)]
    return Example(id=row_id(row, index, source), row=index, input_ids=input_ids, spans=spans,
                   behavior_logprobs=behavior)
