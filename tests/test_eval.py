"""pass@k against brute-force enumeration, bootstrap intervals, the held-out check, one real evaluation."""
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from train.eval import (ConfigError, EvalConfig, bootstrap_ci, compare_with_baseline, evaluate, held_out,
                        held_out_set, occurrence_keys, paired_difference, pass_at_k, read_eval, seen_prompt_sets,
                        summarize)
from train.rollout import COMPARED, PromptConfig
from train.rollout import training_prompt_texts as prompt_texts


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c pass) that contain a passing sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 9, 8) == 1.0  # only 7 failures: every 8-subset holds a pass
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)  # pass@1 is the pass rate
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_bootstrap_ci():
    assert bootstrap_ci(np.full(10, 0.3), 500, seed=0) == pytest.approx((0.3, 0.3))
    v = np.random.default_rng(1).random(200)
    lo, hi = bootstrap_ci(v, 2000, seed=0)
    assert lo < v.mean() < hi
    # the standard error of a mean of 200 uniforms is 0.0204: the 95% interval is about +-1.96 of it
    assert hi - lo == pytest.approx(2 * 1.96 * v.std() / math.sqrt(200), rel=0.15)
    assert bootstrap_ci(v, 2000, seed=0) == bootstrap_ci(v, 2000, seed=0)
    lo_small, hi_small = bootstrap_ci(v[:20], 2000, seed=0)
    assert hi_small - lo_small > hi - lo  # fewer prompts, wider interval


def test_summarize_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0]])
    s = summarize(rewards, rewards >= 1.0, [1, 2, 4], resamples=200, seed=0)
    assert s["prompts"] == 2
    assert s["mean_reward"]["mean"] == pytest.approx((0.25 + 0.625) / 2)
    assert s["pass@1"]["mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert s["pass@2"]["mean"] == pytest.approx((0.5 + (1 - 1 / 6)) / 2)
    assert s["pass@4"]["mean"] == 1.0
    lo, hi = s["pass@1"]["ci95"]
    assert 0.25 <= lo <= hi <= 0.5


def test_held_out_drops_and_reads_prompt_sets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rl.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b "}) + "\n")
    pq.write_table(pa.table({"question": ["c", "d"]}), tmp_path / "sft.parquet")
    seen = prompt_texts(tmp_path / "rl.jsonl") | prompt_texts(tmp_path / "sft.parquet")
    assert seen == {"a", "b", "c", "d"}
    kept, dropped = held_out([{"prompt": p} for p in ["a", "b", "x", "d", "y"]], seen)
    assert [e["prompt"] for e in kept] == ["x", "y"] and dropped == 3
    with pytest.raises(FileNotFoundError):
        prompt_texts(str(tmp_path / "missing.parquet"))


def test_provenance_finds_rl_and_sft_prompts(tmp_path):
    """RL folder -> rl_prompts.jsonl, and through rl_summary.json the SFT folder -> its shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores, sft, rl = tmp_path / "scores", tmp_path / "sft", tmp_path / "rl"
    for d in (scores, sft, rl):
        d.mkdir()
    pq.write_table(pa.table({"prompt": ["s1", "s2"]}), scores / "corpus-00000.parquet")
    (sft / "train_summary.json").write_text(json.dumps({"scores": str(scores)}))
    (rl / "rl_summary.json").write_text(json.dumps({"model": str(sft)}))
    (rl / "rl_prompts.jsonl").write_text(json.dumps({"prompt": "r1"}) + "\n")
    assert seen_prompt_sets(rl) == [rl / "rl_prompts.jsonl", scores]
    assert set().union(*map(prompt_texts, seen_prompt_sets(rl))) == {"s1", "s2", "r1"}


def chat_shards(folder, conversations) -> None:
    """A scoring output folder of a `messages` corpus: shards with no `prompt` or `question` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    ids = [f"c{i}" for i in range(len(conversations))]
    pq.write_table(pa.table({"id": ids, "messages": pa.array(conversations), "input_ids": [[1, 2]] * len(ids)}),
                   folder / "corpus-00000.parquet")
    (folder / "summary.json").write_text(json.dumps({"rows_in": len(ids)}, indent=2))


def test_held_out_check_reads_conversations(tmp_path):
    """A model SFT-trained from `messages` shards: the check reads the conversations' user turns and
    drops the chat prompts whose last user turn the model was trained on (once: no `prompt` column)."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    scores, sft = tmp_path / "scores", tmp_path / "sft"
    chat_shards(scores, [[turn("system", "Be brief."), turn("user", "seen first"), turn("assistant", "a"),
                          turn("user", "seen later"), turn("assistant", "b")]])
    sft.mkdir()
    (sft / "train_summary.json").write_text(json.dumps({"scores": str(scores)}))
    prompts = tmp_path / "eval.jsonl"
    rows = [{"messages": [turn("system", "Be brief."), turn("user", text)], "answer": "1"}
            for text in ("seen later", "new one", "seen first ")]
    rows.append({"prompt": "another new one", "answer": "2"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, dropped, sources, seen = held_out_set(EvalConfig(model=str(sft), prompt_set=PromptConfig(
        prompts=str(prompts))))
    assert [e["prompt"] for e in examples] == ["new one", "another new one"] and dropped == 2
    assert seen == {"seen first", "seen later"} and sources == [str(scores.resolve())]
    assert "last user turn" in COMPARED and "every user turn" in COMPARED


def test_a_relative_path_recorded_by_an_older_run_is_not_skipped(tmp_path, monkeypatch):
    """A summary that names its SFT scores relative to where that run started: from another folder the
    check would have passed against fewer prompts; it now stops, naming the summary and the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "runs" / "mine").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["seen"]}), tmp_path / "runs" / "mine" / "corpus-00000.parquet")
    sft, rl = tmp_path / "runs" / "sft", tmp_path / "runs" / "rl"
    sft.mkdir(), rl.mkdir()
    (sft / "train_summary.json").write_text(json.dumps({"scores": "runs/mine"}))
    (rl / "rl_summary.json").write_text(json.dumps({"model": "runs/sft"}))
    monkeypatch.chdir(tmp_path)
    assert seen_prompt_sets(rl) == [Path("runs/mine")]
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match=r"rl_summary.json names the starting model 'runs/sft', not found"):
        seen_prompt_sets(rl)
    with pytest.raises(FileNotFoundError, match=r"train_summary.json names the SFT scores 'runs/mine', not found"):
        seen_prompt_sets(sft)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "new", "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match="names the SFT scores 'runs/mine', not found"):
        held_out_set(EvalConfig(model=str(sft), prompt_set=PromptConfig(prompts=str(tmp_path / "eval.jsonl"))))


def test_paired_difference_by_hand():
    after, before = np.array([1.0, 0.5, 0.0, 1.0]), np.array([0.0, 0.5, 0.0, 0.5])
    d = paired_difference(after, before, 500, 0)
    assert d["mean"] == pytest.approx(0.375) and d["prompts"] == 4
    assert 0.0 <= d["ci95"][0] <= 0.375 <= d["ci95"][1] <= 1.0  # differences are 1, 0, 0, 0.5
    same = paired_difference(before + 0.25, before, 500, 0)  # a constant shift has no spread
    assert same["ci95"] == [pytest.approx(0.25), pytest.approx(0.25)]


def test_occurrence_keys_pair_repeated_prompts():
    assert occurrence_keys(["a", "b ", "a", "a"]) == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_baseline_comparison_pairs_by_prompt_and_repeat(tmp_path):
    """The baseline's rows are matched by prompt text and repeat, not by position; unshared ones are counted."""
    base = tmp_path / "base"
    base.mkdir()
    rows = [("p", [1, 0]), ("q", [0, 0]), ("p", [0, 0]), ("only-base", [1, 1])]
    (base / "samples.jsonl").write_text("".join(json.dumps({"prompt": t, "rewards": r}) + "\n" for t, r in rows))
    (base / "eval.json").write_text(json.dumps({"model": "m0", "config": {"pass_threshold": 1.0}}))
    examples = [{"prompt": "q"}, {"prompt": "p"}, {"prompt": "p"}, {"prompt": "only-here"}]
    rewards = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    cfg = EvalConfig(bootstrap=200)
    vs = compare_with_baseline(examples, rewards, rewards >= 1.0, [1, 2], read_eval(str(base)), cfg)
    assert (vs["shared_prompts"], vs["prompts_only_here"], vs["prompts_only_in_baseline"]) == (3, 1, 1)
    # pairs: q 1.0 vs 0.0, p#0 1.0 vs 0.5, p#1 0.5 vs 0.0 (pass@1 = pass rate)
    assert vs["pass@1"]["before"] == pytest.approx(0.5 / 3) and vs["pass@1"]["after"] == pytest.approx(2.5 / 3)
    assert vs["pass@1"]["mean"] == pytest.approx(2.0 / 3)
    assert vs["pass@2"]["before"] == pytest.approx(1 / 3) and vs["pass@2"]["after"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="shares no prompts"):
        compare_with_baseline([{"prompt": "x"}], rewards[:1], rewards[:1] >= 1, [1], read_eval(str(base)), cfg)
    with pytest.raises(FileNotFoundError, match="not an eval folder"):
        read_eval(str(tmp_path))


def test_same_held_out_prompts_before_and_after_rl(world, tmp_path):
    """An SFT model and the RL model made from it with the default pool are scored on the same prompts."""
    from train.rl import RLConfig
    from train.rollout import reasoning_gym_examples

    sft, rl = tmp_path / "sft", tmp_path / "rl"
    sft.mkdir(), rl.mkdir()
    (tmp_path / "scores").mkdir()  # SFT prompts outside the eval's range
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["not a chain_sum question"]}), tmp_path / "scores" / "shard.parquet")
    (sft / "train_summary.json").write_text(json.dumps({"scores": str(tmp_path / "scores")}))
    r = RLConfig().prompt_set
    pool = reasoning_gym_examples(r.tasks, r.num_prompts, r.prompt_seed, r.task_kwargs)
    (rl / "rl_prompts.jsonl").write_text("".join(json.dumps({"prompt": e["prompt"]}) + "\n" for e in pool))
    (rl / "rl_summary.json").write_text(json.dumps({"model": str(sft), "prompt_source": {
        "tasks": list(r.tasks), "seed": r.prompt_seed, "size": r.num_prompts}}))
    corpus = (str(world / "corpus-unfiltered.parquet"),)
    before, _, _, _ = held_out_set(EvalConfig(model=str(sft), exclude=corpus))
    after, _, sources, _ = held_out_set(EvalConfig(model=str(rl), exclude=corpus))
    assert [e["prompt"] for e in before] == [e["prompt"] for e in after]
    assert str(rl / "rl_prompts.jsonl") in map(str, sources)
    # without the pool left out, the model before RL would be scored on prompts the RL model drops
    unpooled, _, _, _ = held_out_set(EvalConfig(model=str(sft), exclude=corpus, exclude_rl_pool=False))
    assert len(unpooled) > len(before)


def test_default_split_is_disjoint_by_seed(world):
    """The world's eval seed range gives prompts outside the SFT corpus and the RL pool, up to chance repeats."""
    from train.rl import RLConfig
    from train.rollout import reasoning_gym_examples

    cfg, rl = EvalConfig().prompt_set, RLConfig().prompt_set
    assert cfg.prompt_seed != rl.prompt_seed
    evals = reasoning_gym_examples(cfg.tasks, cfg.num_prompts, cfg.prompt_seed, cfg.task_kwargs)
    pool = reasoning_gym_examples(rl.tasks, rl.num_prompts, rl.prompt_seed, rl.task_kwargs)
    seen = {e["prompt"] for e in pool} | prompt_texts(world / "corpus.parquet")
    kept, dropped = held_out(evals, seen)
    assert not {e["prompt"] for e in kept} & seen
    # the 1-digit 2-term space is small (200 questions), so a few repeats are expected, not many
    assert 0.5 * len(evals) < len(kept) < len(evals) and dropped == len(evals) - len(kept)


@pytest.mark.slow(seconds=12)
def test_evaluate_end_to_end(world, tmp_path):
    """A real evaluation of a fake 'RL output' (the world target plus RL provenance files)."""
    model = tmp_path / "rl_model"
    shutil.copytree(world / "target", model)
    from train.rollout import reasoning_gym_examples

    rl_prompts = reasoning_gym_examples(["chain_sum"], 64, 30_000, EvalConfig().prompt_set.task_kwargs)[:10]
    (model / "rl_prompts.jsonl").write_text("".join(json.dumps({"prompt": e["prompt"]}) + "\n" for e in rl_prompts))
    (model / "rl_summary.json").write_text(json.dumps({"model": str(world / "target"),
                                                       "prompt_source": {"tasks": ["chain_sum"], "seed": 20_000}}))
    out = tmp_path / "eval"
    cfg = EvalConfig(model=str(model), out=str(out), prompt_set=PromptConfig(num_prompts=40, prompt_seed=30_000),
                     n=4, k=(1, 2, 4, 8), max_new_tokens=48,
                     bootstrap=200, exclude=(str(world / "corpus.parquet"),))
    report = evaluate(cfg)

    assert report["k"] == [1, 2, 4]  # 8 > n is skipped
    assert report["held_out"]["dropped_overlapping"] >= 10  # the planted RL prompts were removed
    assert str(model / "rl_prompts.jsonl") in report["held_out"]["checked_against"]
    evaluated = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert (len(evaluated) == report["prompts"]
            and not {e["prompt"] for e in evaluated} & {e["prompt"] for e in rl_prompts})
    g = report["groups"]["all"]
    p = [g[f"pass@{k}"]["mean"] for k in (1, 2, 4)]
    assert p[0] <= p[1] <= p[2] <= 1.0 and 0.0 < p[2]  # the base model solves part of the tasks
    assert g["pass@1"]["ci95"][0] <= p[0] <= g["pass@1"]["ci95"][1]
    # pass@1 is the pass rate of the samples
    rate = np.mean([[r >= 1.0 for r in e["rewards"]] for e in evaluated])
    assert p[0] == pytest.approx(rate)
    md = (out / "eval.md").read_text()
    assert "| pass@4 |" in md and "| mean_reward |" in md
    assert json.loads((out / "eval.json").read_text())["prompts"] == report["prompts"]

    # evaluating on the RL seed is refused: the split is by seed
    with pytest.raises(ConfigError, match="split is by seed"):
        evaluate(EvalConfig(model=str(model), out=str(out), prompt_set=PromptConfig(num_prompts=200), exclude=()))


CHAT_REWARD = '''
import time

from train.rewards import score

def picky(completion, example):
    if example.get("slow"):
        time.sleep(30)  # past --reward-timeout
    if len(completion) % 3 == 0:
        raise ValueError("unlucky length")
    return score(completion, example)
'''


@pytest.mark.slow
def test_evaluate_chat_prompts_end_to_end(world, tmp_path):
    """A real evaluation of a `messages` prompt file (system prompt, then the question): the held-out
    check compares the last user turn and says so, and the failed reward calls (raised, or past
    --reward-timeout) are in reward_errors.jsonl."""
    from train.rollout import reasoning_gym_examples

    examples = reasoning_gym_examples(["chain_sum"], 8, 30_000, EvalConfig().prompt_set.task_kwargs)
    rows = [{"messages": [{"role": "system", "content": "Add the numbers."}, {"role": "user", "content": e["prompt"]}],
             "answer": e["answer"], "task": e["task"], "metadata": e["metadata"]} for e in examples]
    slow = max(i for i, e in enumerate(examples) if e["prompt"] != examples[0]["prompt"])
    rows[slow]["slow"] = True  # every reward call of this prompt runs past the timeout
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(rows))  # a JSON array
    seen = tmp_path / "seen.jsonl"  # an SFT conversation that asked the first question
    seen.write_text(json.dumps({"messages": [{"role": "user", "content": examples[0]["prompt"]},
                                             {"role": "assistant", "content": "no idea"}]}) + "\n")
    reward = tmp_path / "picky.py"
    reward.write_text(CHAT_REWARD)
    out = tmp_path / "eval"
    report = evaluate(EvalConfig(model=str(world / "target"), out=str(out), n=4, k=(1, 4), max_new_tokens=32,
                                 bootstrap=100, exclude=(str(seen),), reward=f"{reward}:picky", reward_timeout=0.2,
                                 prompt_set=PromptConfig(prompts=str(prompts))))
    distinct = len({e["prompt"] for e in examples})
    assert report["held_out"]["dropped_overlapping"] == sum(e["prompt"] == examples[0]["prompt"] for e in examples)
    assert report["prompts"] == len(examples) - report["held_out"]["dropped_overlapping"] and distinct > 1
    assert report["held_out"]["compared"] == COMPARED
    assert report["held_out"]["checked_against"] == [str(seen.resolve())]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= {e["prompt"] for e in examples[1:]}
    errors = [json.loads(x) for x in (out / "reward_errors.jsonl").read_text().splitlines()]
    assert len(errors) == report["reward_errors"] == sum(len(s["reward_errors"]) for s in samples) > 0
    timed_out = [e for e in errors if e["prompt"] == examples[slow]["prompt"]]
    assert len(timed_out) == 4 and all("took longer than 0.2 s" in e["error"] for e in timed_out)
    assert all(len(e["completion"]) % 3 == 0 and "unlucky length" in e["error"] for e in errors if e not in timed_out)
    assert report["model"] == str((world / "target").resolve())

    # one evaluation per output folder: a second one while the first holds it is refused at once
    from common.lock import locked

    with locked(out), pytest.raises(ConfigError, match="in use by another job"):
        evaluate(EvalConfig(model=str(world / "target"), out=str(out), prompt_set=PromptConfig(prompts=str(prompts))))


@pytest.mark.slow(seconds=10)
def test_an_evaluation_of_a_prompt_file_shows_a_bar_and_records_only_what_it_used(world, tmp_path, capsys):
    """`make eval` was silent for minutes between its held-out line and its table, and the eval.json of a
    --prompts run recorded a task, seed and prompt count that chose nothing."""
    from train.rollout import reasoning_gym_examples

    examples = reasoning_gym_examples(["chain_sum"], 6, 30_000, EvalConfig().prompt_set.task_kwargs)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) + "\n" for e in examples))
    out = tmp_path / "eval"
    report = evaluate(EvalConfig(model=str(world / "target"), out=str(out), n=2, k=(1,), max_new_tokens=16,
                                 bootstrap=50, prompt_set=PromptConfig(prompts=str(prompts))))
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "eval: 100%" in bar and f"{report['prompts']}/{report['prompts']} [" in bar and "prompt/s" in bar
    assert "toks/s" not in bar  # vLLM's own postfix, another speed under another name
    recorded = json.loads((out / "eval.json").read_text())["config"]["prompt_set"]
    assert recorded == {"prompts": str(prompts), "answer_column": "answer", "prompts_config": "", "prompts_split": ""}
    # a task run records its tasks and seed, and no prompt file
    assert set(EvalConfig().prompt_set.used()) == {"tasks", "task_kwargs", "num_prompts", "prompt_seed"}
