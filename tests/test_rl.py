"""The RL stage: token layout, weight sync into the running engine, a real run killed and resumed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jobs import Job
from common.config import ConfigError
from train import checkpoint
from train.rl import (RLConfig, combine_stat, learning_summary, longest_sequence, pack, record_step,
                      response_logprobs, rollout_batch, start_outputs, step_prompts, update_policy)
from train.rollout import WORLD_TASK_KWARGS, Sample, prompt_token_ids, reasoning_gym_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pack_layout_by_hand():
    input_ids, label_mask, response_mask = pack([[1, 2], [3]], [[4, 5, 6], [7]])
    assert input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    # hidden state t predicts token t + 1: rows 0 predicts 4, 5, 6 from positions 1, 2, 3
    assert label_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert response_mask.tolist() == [[True, True, True], [True, False, False]]
    assert input_ids[:, 1:][label_mask].tolist() == [4, 5, 6, 7]


def test_response_logprobs_match_a_plain_forward(world):
    """Padded, masked, chunked logprobs equal log_softmax of each unpadded sequence on its own."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).eval()
    prompts, responses = [[3, 17, 40, 9], [5, 6]], [[11, 12], [30, 31, 32, 1]]
    ids, label_mask, response_mask = pack(prompts, responses)
    with torch.no_grad():
        lp = response_logprobs(lm, ids, label_mask, response_mask, chunk=3)  # chunk < tokens: several chunks
        for i, (p, r) in enumerate(zip(prompts, responses)):
            x = torch.tensor([p + r])
            ref = lm(x).logits[0, :-1].log_softmax(-1).gather(1, x[0, 1:, None])[:, 0][len(p) - 1:]
            torch.testing.assert_close(lp[i, : len(r)], ref, atol=1e-5, rtol=0)
    assert (lp[~response_mask] == 0).all()


def test_step_prompts_cover_the_pool_each_pass():
    steps = [step_prompts(20, 4, seed=0, step=s) for s in range(5)]  # one pass
    assert sorted(i for s in steps for i in s) == list(range(20))
    assert step_prompts(20, 4, 0, 3) == steps[3]  # a function of the step alone: resumable
    assert step_prompts(20, 4, 0, 5) != steps[0]  # the next pass is reshuffled
    assert step_prompts(20, 4, 1, 0) != steps[0]


def test_an_engine_of_the_same_seed_samples_the_same_with_or_without_logprobs(world, tokenizer):
    """What the evaluation relies on: without sampling logprobs the samples are those drawn with
    them, and a second engine in the same process samples as a first one of its seed did. On the
    CPU no sampling compiles anything (common.vllm_engine.generate)."""
    from torch._dynamo.utils import counters

    from train.rollout import RolloutEngine

    prompts = [prompt_token_ids(tokenizer, e["prompt"])
               for e in reasoning_gym_examples(["chain_sum"], 6, 30_000, WORLD_TASK_KWARGS)]
    drawn, compiled = [], dict(counters["frames"])  # what this process compiled so far
    for logprobs in (True, False):
        engine = RolloutEngine(str(world / "target"), max_model_len=256, seed=3)
        try:
            drawn.append([[s.token_ids for s in g] for g in engine.generate(prompts, 4, 1.0, 24, logprobs=logprobs)])
            assert all((s.logprobs is not None) == logprobs for g in engine.generate(prompts[:1], 2, 1.0, 8,
                                                                                      logprobs=logprobs) for s in g)
        finally:
            engine.close()
    assert drawn[0] == drawn[1]
    assert len({tuple(ids) for g in drawn[0] for ids in g}) > len(prompts)  # temperature 1: not one answer each
    assert dict(counters["frames"]) == compiled  # no frame went through torch.compile


def test_weights_reach_the_running_engine(world, tokenizer):
    """After an optimizer step and a push, the engine's logprobs equal the trainer's (float32: < 1e-3)."""
    from transformers import AutoModelForCausalLM

    from scorer.engines import prompt_logprobs
    from train.rl_math import clipped_policy_loss, tis_weights
    from train.rollout import RolloutEngine

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).eval()
    engine = RolloutEngine(str(world / "target"), max_model_len=256, seed=0)
    try:
        prompts = [prompt_token_ids(tokenizer, e["prompt"])
                   for e in reasoning_gym_examples(["chain_sum"], 4, 20_000, WORLD_TASK_KWARGS)]

        def sample_and_compare():
            """Sampling logprobs vs the trainer's on the same sampled tokens: (B, T) each."""
            samples = [s for g in engine.generate(prompts, 2, 1.0, 24) for s in g]
            ids, label_mask, response_mask = pack([p for p in prompts for _ in range(2)],
                                                  [s.token_ids for s in samples])
            sampling = torch.zeros(response_mask.shape)
            for i, s in enumerate(samples):
                sampling[i, : len(s.logprobs)] = torch.from_numpy(s.logprobs)
            with torch.no_grad():
                trainer = response_logprobs(lm, ids, label_mask, response_mask, 4096)
            return samples, (ids, label_mask, response_mask), trainer, sampling

        samples, batch, old_lp, sampling = sample_and_compare()
        assert (old_lp - sampling)[batch[2]].abs().max() < 1e-3
        torch.testing.assert_close(tis_weights(old_lp, sampling, 2.0)[batch[2]],
                                   torch.ones(int(batch[2].sum())), atol=2e-3, rtol=0)

        # one real RL optimizer step, with made-up advantages
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
        adv = torch.tensor([1.0, -1.0] * 4)
        loss, _ = clipped_policy_loss(response_logprobs(lm, *batch, 4096), old_lp, adv, batch[2])
        loss.backward()
        opt.step()

        fixed, plen = prompts[0] + samples[0].token_ids, len(prompts[0])
        before = prompt_logprobs(engine.llm, [fixed], [plen])[0]
        engine.push_weights(lm)
        after = prompt_logprobs(engine.llm, [fixed], [plen])[0]
        ids, label_mask, response_mask = pack([prompts[0]], [samples[0].token_ids])
        with torch.no_grad():
            trainer = response_logprobs(lm, ids, label_mask, response_mask, 4096)[0].numpy()
        assert np.abs(after - trainer).max() < 1e-3
        assert np.abs(before - trainer).max() > 1e-2  # the step did move them: the check is not vacuous

        # fresh samples now carry the updated policy's logprobs
        _, batch, new_lp, sampling = sample_and_compare()
        assert (new_lp - sampling)[batch[2]].abs().max() < 1e-3
    finally:
        engine.close()


REWARD = '''
def score(completion, example):
    """Rewards odd lengths (so every group has signal); raises on some rows, which must count as 0."""
    if len(completion) % 7 == 0:
        raise ValueError("unlucky length")
    return float(len(completion) % 2)
'''


@pytest.mark.slow(seconds=55)
def test_rl_run_killed_then_resumed(world, tmp_path):
    """A real run: killed after its second checkpoint, rerun to the end; every parameter has moved."""
    from transformers import AutoModelForCausalLM

    reward = tmp_path / "odd_reward.py"
    reward.write_text(REWARD)
    out = tmp_path / "rl"
    steps = 8
    cmd = [sys.executable, "-m", "train.rl", "--model", str(world / "target"), "--out", str(out),
           "--steps", str(steps), "--prompts-per-step", "4", "--samples-per-prompt", "4", "--num-prompts", "32",
           "--max-new-tokens", "24", "--save-every", "1", "--lr", "1e-3", "--reward", f"{reward}:score",
           "--snapshot-steps", "3,6", "--report-to", "tensorboard", "--progress", "false"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}

    def latest_checkpoint() -> int:  # older checkpoints are removed as newer ones land (keep 2)
        folder = checkpoint.latest(out)
        return int(folder.name.split("-")[1]) if folder else 0

    with Job(cmd, tmp_path / "job.log", cwd=ROOT, env=env) as job:
        job.wait_until(lambda: latest_checkpoint() >= 2, "its second checkpoint", every=0.05)
        job.kill()
    killed_at = latest_checkpoint()
    assert killed_at < steps and not (out / "rl_summary.json").exists()

    # other settings on the same folder are refused, before any work
    bad = subprocess.run(cmd[:-2] + ["--lr", "5e-4"], cwd=ROOT, env=env, timeout=120, capture_output=True, text=True)
    assert bad.returncode == 2 and "other settings or data (lr)" in bad.stderr

    done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "rl_summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # no step lost, none twice
    for key in ("mean_reward", "pass_rate", "response_length", "ratio_mean", "clip_fraction", "kl_ref", "tis_mean",
                "tis_capped_fraction", "logprob_gap_mean", "tokens_per_s", "reward_errors"):
        assert all(m[key] is not None for m in metrics), key
    assert all(m["logprob_gap_mean"] < 1e-3 for m in metrics)  # engine and trainer agree in float32
    assert all(0.99 < m["tis_mean"] < 1.01 for m in metrics)
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints
    # TensorBoard has every step once, the killed run's steps past its checkpoint dropped
    from test_tracking import tensorboard_scalars

    scalars, _ = tensorboard_scalars(out / "tensorboard")
    assert scalars["train/mean_reward"] == [(m["step"], pytest.approx(m["mean_reward"])) for m in metrics]

    # a raising reward counted as 0 and was logged with its row; the run went on
    errors = [json.loads(x) for x in (out / "reward_errors.jsonl").read_text().splitlines()]
    assert sum(m["reward_errors"] for m in metrics) == len(errors) > 0
    assert all(len(e["completion"]) % 7 == 0 and "unlucky length" in e["error"] for e in errors)

    # the output is a HF folder whose every parameter moved away from the start
    start = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).state_dict()
    end = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert start.keys() == end.keys()
    for name in start:
        assert not torch.equal(start[name], end[name]), f"{name} did not change"
    assert (out / "tokenizer.json").exists() and (out / "rl_prompts.jsonl").exists()

    # the snapshots asked for are kept beside the checkpoints' rotation, each a model of its step
    # that names its run, so an evaluation of it finds the run's prompts
    from train.eval import seen_prompt_sets

    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000003", "step-000006"]
    snap = out / "snapshots" / "step-000006"
    assert json.loads((snap / "snapshot.json").read_text()) == {"run": str(out.resolve()), "step": 6}
    mid = AutoModelForCausalLM.from_pretrained(snap, dtype=torch.float32).state_dict()
    assert any(not torch.equal(mid[name], end[name]) for name in end)  # two more steps moved it
    assert [p.resolve() for p in seen_prompt_sets(snap)] == [(out / "rl_prompts.jsonl").resolve()]


CAREFUL_REWARD = '''
def score(completion, example):
    """1 for the careful procedure (a line such as 4-1=3), whether or not its sum is right."""
    return float("=" in completion)
'''


@pytest.mark.world_draw
@pytest.mark.slow(seconds=50)
def test_embedded_recipe_raises_a_reward_the_base_sometimes_earns(world, tmp_path):
    """RL learns: `make rl`'s recipe from the world's base, a few steps, with a 0/1 reward built to be
    learnable in any draw of the world. Every base is pretrained to write the careful procedure in
    `target_careful_share` (0.3) of its answers and to guess otherwise, so the reward for the careful
    procedure starts well inside (0, 1) and sampled groups hold both kinds. (Correctness, the
    recipe's own reward, rises too, but how much in 8 steps depends on the draw.)"""
    from pipelines.recipes import recipe_file
    from pipelines.world import WorldConfig

    reward = tmp_path / "careful_reward.py"
    reward.write_text(CAREFUL_REWARD)
    out = tmp_path / "rl"
    recipe = ["--config", str(recipe_file("rl")), "--steps", "8", "--save-every", "0", "--progress", "false",
              "--reward", f"{reward}:score"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run([sys.executable, "-m", "train.rl", "--model", str(world / "target"), "--out", str(out),
                           *recipe], cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [s["mean_reward"] for s in steps]
    # 0/1 rewards at pass threshold 1: a step's mean reward is its pass rate (partial credit would exceed it)
    assert rewards == pytest.approx([s["pass_rate"] for s in steps], abs=1e-6)
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    share = WorldConfig().target_careful_share
    assert share / 3 < first < 1 - share, f"the base lacks the share it was built with: {rewards}"
    assert last > first + 0.1, rewards


def test_a_steps_ratio_max_is_the_largest_over_mini_batches():
    values = {"ratio_max": [1.1, 1.5, 1.2], "ratio_min": [0.9, 0.7, 0.8], "loss": [1.0, 2.0, 3.0]}
    for name, vs in values.items():
        got = None
        for v in vs:
            got = combine_stat(name, got, v, len(vs))
        assert got == pytest.approx({"ratio_max": 1.5, "ratio_min": 0.7, "loss": 2.0}[name])


# ---- the run's steps, alone -----------------------------------------------------------------------

def test_the_summary_reads_the_first_and_last_quarter_of_the_metric_lines():
    rewards = [0.1, 0.3, 0.4, 0.4, 0.5, 0.6, 0.8, 1.0]
    steps = [{"step": i + 1, "mean_reward": r, "pass_rate": r / 2, "reward_errors": i % 3}
             for i, r in enumerate(rewards)]
    s = learning_summary(steps)  # 8 steps: windows of 2
    assert list(s) == ["mean_reward_first", "mean_reward_last", "pass_rate_first", "pass_rate_last", "window_steps",
                       "reward_errors"]  # the order of rl_summary.json
    assert s == {"mean_reward_first": pytest.approx(0.2), "mean_reward_last": pytest.approx(0.9),
                 "pass_rate_first": pytest.approx(0.1), "pass_rate_last": pytest.approx(0.45), "window_steps": 2,
                 "reward_errors": 0 + 1 + 2 + 0 + 1 + 2 + 0 + 1}
    assert learning_summary(steps * 5)["window_steps"] == 5  # at most 5
    short = learning_summary(steps[:3])  # under 8 steps: windows of 1
    assert (short["window_steps"], short["mean_reward_first"], short["mean_reward_last"]) == (1, 0.1, 0.4)
    assert learning_summary([]) == {"mean_reward_first": None, "mean_reward_last": None, "pass_rate_first": None,
                                    "pass_rate_last": None, "window_steps": 1, "reward_errors": 0}


def test_the_longest_sequence_is_checked_against_the_model_and_the_budget(world):
    from dataclasses import replace

    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(world / "target").max_position_embeddings
    examples = [{"prompt_ids": [3] * 5}, {"prompt_ids": [3] * 9}]
    cfg = RLConfig(model=str(world / "target"), max_new_tokens=24, micro_batch_tokens=0)
    assert longest_sequence(cfg, examples) == 9 + 24
    assert longest_sequence(replace(cfg, micro_batch_tokens=33), examples) == 33  # a budget of just the longest row
    with pytest.raises(ConfigError, match=r"^micro_batch_tokens 32 is less than the longest sequence \(longest "
                                          r"prompt \+ max_new_tokens = 33 tokens\); give at least that, or 0"):
        longest_sequence(replace(cfg, micro_batch_tokens=32), examples)
    assert longest_sequence(replace(cfg, max_new_tokens=limit - 9), examples) == limit
    with pytest.raises(ConfigError, match=rf"^longest prompt \+ max_new_tokens = {limit + 1} tokens, over the "
                                          rf"model's {limit}$"):
        longest_sequence(replace(cfg, max_new_tokens=limit - 8), examples)


def test_the_bar_names_each_metric_as_the_metrics_do(tmp_path):
    # the bar showed `pass_=` (a keyword argument's spelling) for the pass rate
    import io

    from tqdm import tqdm

    from train.tracking import Tracker

    metrics_path, errors_path = start_outputs(tmp_path / "rl", [{"prompt": "q", "answer": "a"}], None)
    shown = io.StringIO()
    bar = tqdm(total=2, file=shown, desc="rl")
    record_step({"step": 1, "mean_reward": 0.25, "pass_rate": 0.5, "response_length": 7.0, "tis_mean": None}, [],
                metrics_path, errors_path, Tracker(), bar)
    bar.close()
    line = shown.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "pass_rate=0.50" in line and "reward=0.250" in line and "pass_=" not in line


def test_step_lines_are_recorded_and_cut_back_on_resume(tmp_path, caplog):
    """A step's metrics line and reward errors land in their files, the tracker and the bar; a resumed
    run keeps the lines of the steps its checkpoint holds, a fresh one none."""
    from test_records import Seen  # a tracker and a progress bar that remember their calls

    examples = [{"prompt": "1+1", "answer": "2", "task": "chain_sum"}, {"prompt": "q", "answer": "a"}]
    out = tmp_path / "rl"
    metrics_path, errors_path = start_outputs(out, examples, None)
    assert metrics_path.read_text() == errors_path.read_text() == ""
    assert [json.loads(x) for x in (out / "rl_prompts.jsonl").read_text().splitlines()] == [
        {"prompt": "1+1", "answer": "2", "task": "chain_sum"}, {"prompt": "q", "answer": "a", "task": None}]
    seen = Seen()
    for step in (1, 2):
        metrics = {"step": step, "mean_reward": 0.25 * step, "pass_rate": 0.5, "response_length": 7.0,
                   "tis_mean": None}
        errors = [{"prompt": "q", "error": "boom"}] * (step - 1)  # none at step 1, one at step 2
        record_step(metrics, errors, metrics_path, errors_path, seen, seen)
    calls = [(what, arg["reward"] if what == "postfix" else arg) for what, arg in seen.calls]
    assert calls == [("log", 1), ("update", 1), ("postfix", "0.250"), ("log", 2), ("update", 1), ("postfix", "0.500")]
    assert [json.loads(x)["step"] for x in metrics_path.read_text().splitlines()] == [1, 2]
    rows = [json.loads(x) for x in errors_path.read_text().splitlines()]
    assert rows == [{"step": 2, "prompt": "q", "error": "boom"}]
    assert "step 2: 1 rewards raised and count as 0 (first: boom)" in caplog.text

    start_outputs(out, examples, 1)  # resumed at step 1: step 2 runs again
    assert [json.loads(x)["step"] for x in metrics_path.read_text().splitlines()] == [1]
    assert errors_path.read_text() == ""
    start_outputs(out, examples, None)  # afresh
    assert metrics_path.read_text() == ""


# ---- micro-batches: the same step in less memory --------------------------------------------------

def made_up_rollouts(vocab: int, P: int, n: int, seed: int = 0):
    """P prompts x n samples of assorted lengths, with engine logprobs near the model's."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, vocab, size=int(rng.integers(3, 10)))] for _ in range(P)]
    samples = []
    for _ in range(P * n):
        m = int(rng.integers(1, 14))
        samples.append(Sample([int(t) for t in rng.integers(3, vocab, size=m)],
                              rng.normal(-np.log(vocab), 0.3, size=m).astype(np.float32), bool(rng.integers(2))))
    return [p for p in prompts for _ in range(n)], samples, torch.tensor(rng.normal(size=P * n), dtype=torch.float32)


@pytest.mark.parametrize("aggregation, mini_batches", [("token", 1), ("sequence", 1), ("token", 2)])
def test_an_accumulated_step_is_the_one_shot_step(world, aggregation, mini_batches):
    """The trainer's part of a step (no-grad passes, then `mini_batches` optimizer steps) in
    micro-batches of at most 40 padded tokens, with and without gradient checkpointing, equals the
    whole batch at once: the logprobs (to
    float32 rounding), the logged loss statistics, the gradient norms and every parameter after the
    steps, to 1e-6. The optimizer is SGD at lr 1, so a parameter moves by its clipped gradient:
    AdamW's first step moves every weight by about lr whatever the size of its gradient, which
    turns float32 rounding of near-zero gradients into 1e-5 differences (at lr 1e-3)."""
    from contextlib import nullcontext

    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(world / "target").vocab_size
    prompts, samples, advantages = made_up_rollouts(vocab, 6, 4)
    batch = rollout_batch(prompts, samples, torch.device("cpu"))
    assert batch.lengths.max() <= 40 < batch.input_ids.numel()
    start = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).state_dict()
    results = []
    for budget, recompute in ((0, False), (40, False), (40, True)):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32)
        if recompute:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref = AutoModelForCausalLM.from_pretrained(world / "target", dtype=torch.float32).eval()
        with torch.no_grad():  # a reference that differs from the policy, so that the KL term pulls
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        cfg = RLConfig(aggregation=aggregation, mini_batches=mini_batches, micro_batch_tokens=budget, kl_coef=0.1,
                       tis_cap=1.5, max_grad_norm=0.5)
        optimizer = torch.optim.SGD(lm.parameters(), lr=1.0)
        pushes = []
        out = update_policy(lm, ref, optimizer, batch, advantages, cfg, nullcontext(), lambda p=pushes: p.append(1))
        results.append((out, lm.state_dict(), len(pushes)))
    (old0, ref0, tis0, losses0, norms0), params0, pushes0 = results[0]
    assert losses0.keys() == {"loss", "ratio_mean", "ratio_max", "ratio_min", "clip_fraction", "approx_kl"}
    for (old1, ref1, tis1, losses1, norms1), params1, pushes1 in results[1:]:
        assert pushes1 == pushes0 == mini_batches  # the engine gets the weights after each optimizer step
        for a, b in ((old0, old1), (ref0, ref1), (tis0, tis1)):  # logprobs near -6: float32 rounding is ~1e-6
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
        # float32 sums in another order, and the second mini-batch's ratios go up to ~20: relative 1e-5
        assert losses1 == pytest.approx(losses0, rel=1e-5, abs=1e-6) and norms1 == pytest.approx(norms0, rel=1e-5)
        for name in params0:
            torch.testing.assert_close(params1[name], params0[name], atol=1e-6, rtol=0, msg=name)
    moved = max(float((params0[name] - start[name]).abs().max()) for name in params0)
    assert moved > 1e-2  # the steps did move the weights: the comparison is not vacuous
    assert (tis0 < 1.5).any() and (tis0 == 1.5).any()  # TIS weights in play, some capped


def test_bad_memory_settings_are_one_line_and_exit_2_before_the_engine(world, tmp_path, capsys):
    """A budget under the longest sequence, a negative one, or no KV cache: one line, exit 2,
    nothing written; a budget that is not a number: one line naming the flag, exit 2."""
    from train import rl as rl_train

    out = tmp_path / "rl"
    base = ["--model", str(world / "target"), "--out", str(out), "--max-new-tokens", "24"]
    for flags, words in [(["--micro-batch-tokens", "30"], "micro_batch_tokens 30 is less than the longest sequence"),
                         (["--micro-batch-tokens", "-1"], "micro_batch_tokens must be >= 0"),
                         (["--cpu-kv-cache-gib", "0"], "cpu_kv_cache_gib must be >= 1"),
                         (["--steps", "10", "--snapshot-steps", "5,11"], "every step must be in 1..steps=10"),
                         (["--snapshot-steps", "5;6"], "snapshot_steps: comma-separated step numbers")]:
        assert rl_train.main(base + flags) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert not out.exists()
    with pytest.raises(SystemExit) as e:
        rl_train.main(base + ["--micro-batch-tokens", "4k"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: --micro-batch-tokens: invalid literal for int() with base 10: '4k'"


@pytest.mark.slow(seconds=27)
def test_the_memory_bench_runs_on_a_tiny_model(tmp_path):
    """`python -m bench.bench_rl_memory --smoke`: each run in its own process, the budget's run in
    several micro-batches, the old behaviour's in one, the peaks in the JSON."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench_rl_memory", "--smoke", "--sizes", "2",
                           "--modes", "budget,whole", "--out", str(out)], cwd=ROOT, timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["budget"]["micro_batches"] > 1 and runs["whole"]["micro_batches"] == 1
    assert all(0 < r["ready_gib"] <= r["peak_gib"] for r in runs.values())
    assert "budget          2 x 8: peak" in done.stdout
