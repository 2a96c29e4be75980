"""Rewards on right, wrong and malformed answers; user rewards by path; a raising reward counts as 0."""
import json
import math

import pytest

from train.rewards import (extract_final_answer, load_reward, safe_score, score, score_math, score_reasoning_gym,
                           score_reasoning_gym_partial)

CHAIN = {"task": "chain_sum", "prompt": "State the final answer to the following arithmetic problem: 4 + 6 + 2 =",
         "question": "State the final answer to the following arithmetic problem: 4 + 6 + 2 =", "answer": "12",
         "metadata": {"expression": "4 + 6 + 2"}}


@pytest.mark.parametrize("completion, expected", [
    ("4+6=10\n10+2=12\nAnswer: 12", "12"),  # the base model's style
    ("Start with 4. Add 6 to get 10. Add 2 to get 12. The answer is 12.", "12"),  # the behavior model's
    ("<answer>12</answer>", "12"),  # reasoning-gym's own format
    ("so x = \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("Answer: 3\nwait, no.\nAnswer: 5", "5"),  # the last statement counts
    ("4+6=10\n10+2=12", None),  # no final answer: malformed
    ("\\boxed{12", None),  # unclosed box
    ("Answer:", None),
    ("I answered 12 times", None),  # 'answer' inside a word is not a statement
])
def test_extract_final_answer(completion, expected):
    assert extract_final_answer(completion) == expected


def test_reasoning_gym_checker_right_wrong_malformed():
    assert score_reasoning_gym("4+6=10\n10+2=12\nAnswer: 12", CHAIN) == 1.0
    assert score_reasoning_gym("The answer is 12.", CHAIN) == 1.0
    assert score_reasoning_gym("Answer: 13", CHAIN) == 0.0
    assert score_reasoning_gym("4+6=10\n10+2=12", CHAIN) == 0.0  # right number, never stated
    assert score_reasoning_gym("", CHAIN) == 0.0
    # reasoning-gym's checker gives partial credit when the answer contains the oracle; the
    # default counts full credit only, the partial reward is an explicit option
    assert score_reasoning_gym_partial("Answer: 112", CHAIN) == pytest.approx(2 / 3)
    assert score_reasoning_gym("Answer: 112", CHAIN) == 0.0
    assert score("Answer: 112", CHAIN) == 0.0
    assert score_reasoning_gym_partial("Answer: 12", CHAIN) == 1.0
    assert load_reward("reasoning_gym_partial") is score_reasoning_gym_partial
    assert load_reward("default") is score


def test_reasoning_gym_checker_uses_metadata():
    """countdown is checked by evaluating the expression against the example's numbers and target."""
    import reasoning_gym as rg

    entry = rg.create_dataset("countdown", size=1, seed=3)[0]
    example = {"task": "countdown", "prompt": entry["question"], "question": entry["question"],
               "answer": entry["answer"], "metadata": entry["metadata"]}
    assert score(f"<answer>{entry['answer']}</answer>", example) == 1.0
    assert score("<answer>1 + 1</answer>", example) < 1.0
    # malformed: reasoning-gym's own floor for countdown (0.01), far from a pass
    assert score("no idea", example) < 0.05


def test_math_verify_right_wrong_malformed():
    half = {"prompt": "What is 1/2?", "answer": "\\frac{1}{2}"}
    assert score_math("so \\boxed{\\frac{1}{2}}", half) == 1.0
    assert score_math("The final answer is 0.5", half) == 1.0  # equal as numbers
    assert score_math("Answer: 1/2", half) == 1.0
    assert score_math("\\boxed{0.25}", half) == 0.0
    assert score_math("1/2 I think", half) == 0.0  # no final-answer statement
    assert score_math("\\boxed{\\frac{1}{2}", half) == 0.0  # unclosed
    assert score_math("\\boxed{(((}", half) == 0.0  # unparsable
    assert score_math("Answer: 12", {"answer": "12"}) == 1.0


def test_default_score_dispatches_on_task():
    assert score("Answer: 12", CHAIN) == 1.0  # reasoning-gym checker
    assert score("Answer: 112", CHAIN) == 0.0  # a partial-credit near miss earns nothing by default
    assert score("Answer: 112", {"prompt": "?", "answer": "12"}) == 0.0  # no task: math-verify
    assert score("\\boxed{12}", {"prompt": "?", "answer": "12", "task": "my_own"}) == 1.0


def test_load_reward_by_name_module_and_file(tmp_path):
    assert load_reward("default") is score
    assert load_reward("math") is score_math
    assert load_reward("reasoning_gym") is score_reasoning_gym
    assert load_reward("train.rewards:score_math") is score_math
    f = tmp_path / "my_reward.py"
    f.write_text("def score(completion, example):\n    return float(len(completion) == len(example['answer']))\n")
    fn = load_reward(f"{f}:score")
    assert fn("12", {"answer": "34"}) == 1.0 and fn("1", {"answer": "34"}) == 0.0
    for bad in ("nonsense", "no_such_module_xyz:score", "train.rewards:no_such_function", f"{tmp_path}/none.py:f"):
        with pytest.raises(ValueError):
            load_reward(bad)


def test_safe_score_turns_failures_into_zero():
    def raises(completion, example):
        return 1 / 0

    value, err = safe_score(raises, "Answer: 12", CHAIN)
    assert value == 0.0 and err.startswith("ZeroDivisionError")
    value, err = safe_score(lambda c, e: math.nan, "x", CHAIN)
    assert value == 0.0 and "non-finite" in err
    value, err = safe_score(lambda c, e: "not a number", "x", CHAIN)
    assert value == 0.0 and err == "returned str 'not a number', not a number"  # no float("0.75") either
    assert safe_score(score, "Answer: 12", CHAIN) == (1.0, None)


def test_rewards_of_a_group_log_the_failing_rows():
    from train.rl import score_groups

    def picky(completion, example):
        if "boom" in completion:
            raise RuntimeError("cannot parse")
        return score(completion, example)

    rewards, errors = score_groups(picky, [["Answer: 12", "boom", "Answer: 3"]], [CHAIN])
    assert rewards.tolist() == [[1.0, 0.0, 0.0]]
    assert len(errors) == 1 and errors[0]["completion"] == "boom" and errors[0]["sample"] == 1
    assert "RuntimeError: cannot parse" in errors[0]["error"] and errors[0]["prompt"] == CHAIN["prompt"]


def test_a_stopped_steps_failed_rewards_are_logged(tmp_path):
    from common.config import ConfigError
    from train.rl import score_groups

    def broken(completion, example):
        raise KeyError("solution")

    path = tmp_path / "reward_errors.jsonl"
    with pytest.raises(ConfigError, match=f"more than 50% of a step's rewards failed .*rows in {path}"):
        score_groups(broken, [["a", "b"], ["c", "d"]], [CHAIN, CHAIN], max_failures=0.5, errors_path=path, step=3)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 and {r["step"] for r in rows} == {3} and rows[0]["error"] == "KeyError: 'solution'"


BROKEN_REWARD = '''
def score(completion, example):
    return example["solution"] == completion
'''


@pytest.mark.slow(seconds=15)
def test_rl_stopped_by_a_broken_reward_logs_its_rows(world, tmp_path, capsys):
    """A reward that fails on every call stops the run at its first step with exit 2, and
    reward_errors.jsonl holds the calls that failed (it once stayed empty)."""
    from train import rl

    reward = tmp_path / "broken.py"
    reward.write_text(BROKEN_REWARD)
    out = tmp_path / "rl"
    rc = rl.main(["--model", str(world / "target"), "--out", str(out), "--steps", "2", "--prompts-per-step", "2",
                  "--samples-per-prompt", "2", "--num-prompts", "8", "--max-new-tokens", "8", "--progress", "false",
                  "--reward", f"{reward}:score"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "more than 50% of a step's rewards failed" in err and "KeyError: 'solution'" in err
    rows = [json.loads(x) for x in (out / "reward_errors.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(r["step"] == 1 and r["error"] == "KeyError: 'solution'" for r in rows)
    assert all({"prompt", "answer", "sample", "completion"} <= set(r) for r in rows)
