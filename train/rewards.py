"""Verifiable rewards. A reward is one function `score(completion, example) -> float`.

    completion  the decoded response text (special tokens removed)
    example     the prompt's row: at least `prompt` and `answer`; reasoning-gym prompts also
                carry `task` (the dataset name), `question` and `metadata`

Built in:
    score                 the default: reasoning-gym's own checker when `example["task"]` is one
                          of its datasets, else math-verify
    score_reasoning_gym   1.0 when the dataset's own `score_answer` gives the final answer (see
                          `extract_final_answer`) full credit, else 0.0
    score_reasoning_gym_partial  the dataset's `score_answer` as it is, partial credit included
                          (chain_sum gives 0.5 for "-2" against "2"); an explicit option only
    score_math            math-verify: the gold `answer` against the completion's `\\boxed{}` or
                          final-answer statement, equal as mathematical objects (1/2 == 0.5)

Users add their own with `--reward my_pkg.my_rewards:score` or `--reward path/to/file.py:score`.
A reward that raises is not allowed to stop a run: `safe_score` turns it into 0 plus the error.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import math
import re
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("pear.rewards")

Reward = Callable[[str, dict], float]

_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
# "Answer: 7", "The answer is 7.", "final answer is: 7": the rest of that line
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:\s+is)?\s*[:=]?\s*([^\s:=].*)?", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(completion: str) -> str | None:
    """The completion's final answer as a string, or None when it states none (malformed).

    In order: the last <answer>...</answer> (reasoning-gym's format), the last \\boxed{...}, the
    last "answer is X" / "Answer: X" (rest of that line, trailing period dropped). A bare number
    elsewhere in the text is not an answer: reasoning that never concludes earns nothing.
    """
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    phrases = [m.group(1) or "" for line in completion.splitlines() if (m := _ANSWER_PHRASE.search(line))]
    if phrases:
        answer = phrases[-1].strip().rstrip(".").strip()
        return answer or None
    return None


@functools.lru_cache(maxsize=None)
def _rg_checker(task: str):
    import reasoning_gym as rg

    return rg.get_score_answer_fn(task)  # builds a default dataset object once per task


def is_reasoning_gym_task(name) -> bool:
    from reasoning_gym.factory import DATASETS

    return isinstance(name, str) and name in DATASETS


def score_reasoning_gym_partial(completion: str, example: dict) -> float:
    """reasoning-gym's checker for `example["task"]` on the extracted final answer, partial credit kept."""
    entry = {"question": example.get("question", example.get("prompt", "")), "answer": str(example["answer"]),
             "metadata": example.get("metadata") or {}}
    return float(_rg_checker(example["task"])(extract_final_answer(completion), entry))


def score_reasoning_gym(completion: str, example: dict) -> float:
    """1.0 when reasoning-gym's checker gives the final answer full credit, else 0.0.

    Partial credit (a near miss scored 0.5, say) becomes a full-size advantage once GRPO divides
    by the group's spread, so the default counts only what pass@k counts: fully correct answers.
    """
    return 1.0 if score_reasoning_gym_partial(completion, example) >= 1.0 else 0.0


def score_math(completion: str, example: dict) -> float:
    """1.0 when math-verify finds the completion's final answer equal to the gold answer, else 0.0."""
    from math_verify import parse, verify

    gold = parse(str(example["answer"]))
    if not gold:  # plain text that math-verify cannot read, e.g. "x = 3": try it as LaTeX
        gold = parse(f"${example['answer']}$")
    stated = extract_final_answer(completion)
    if stated is None or not gold:  # no stated final answer: malformed, no credit
        return 0.0
    pred = parse(f"${stated}$")  # math-verify reads the statement as LaTeX: \frac{1}{2}, 0.5, 2^{3}
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


def score(completion: str, example: dict) -> float:
    """The default reward, 0 or 1: reasoning-gym's checker (full credit) for its tasks, math-verify otherwise."""
    if is_reasoning_gym_task(example.get("task")):
        return score_reasoning_gym(completion, example)
    return score_math(completion, example)


BUILT_IN: dict[str, Reward] = {"default": score, "": score, "reasoning_gym": score_reasoning_gym,
                                "reasoning_gym_partial": score_reasoning_gym_partial, "math": score_math}
# what --reward takes, as the stages' help says it
REWARD_HELP = (f"{', '.join(name for name in BUILT_IN if name)} (default: 0/1, reasoning-gym's checker at full "
               "credit for its tasks, else math-verify), or 'module:function' / 'file.py:function'")


def load_reward(spec: str) -> Reward:
    """A reward by name (see BUILT_IN) or 'module.path:function' / 'file.py:function'."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if ":" not in spec:
        raise ValueError(f"reward must be one of {', '.join(BUILT_IN)} or 'module:function', got {spec!r}")
    module_name, func_name = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise ValueError(f"reward file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(f"pear_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # a SyntaxError, a failing import inside it: whatever its code raises
            raise ValueError(f"reward file {path} cannot be loaded: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ValueError(f"cannot import reward module {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {func_name!r}")
    return fn


class RewardTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise RewardTimeout in this thread after `seconds` (0: no limit). A timer signal interrupts
    Python code, sleeps and I/O; it only works in the main thread, elsewhere there is no limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def safe_score(fn: Reward, completion: str, example: dict, timeout: float = 0.0) -> tuple[float, str | None]:
    """(reward, error): a reward that raises, runs past `timeout` seconds, or returns anything but a
    finite real number (a str such as "0.75" included) counts as 0.0, with the reason."""
    try:
        with time_limit(timeout):
            value = fn(completion, example)
    except Exception as e:  # a user's reward must not stop the run; the row is logged instead
        return 0.0, f"{type(e).__name__}: {e}"
    if not isinstance(value, (int, float, np.integer, np.floating)):  # bool is an int: pass/fail
        return 0.0, f"returned {type(value).__name__} {str(value)[:30]!r}, not a number"
    value = float(value)
    if not math.isfinite(value):
        return 0.0, f"non-finite reward {value!r}"
    return value, None
