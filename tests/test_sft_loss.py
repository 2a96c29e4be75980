"""Weighted-SFT math on hand-sized tensors: the loss, its normalisation, weights, batching, schedule."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from scorer.weights import WeightParams, pear_weights
from train.data import Rows, collate, idle_batch, is_heldout, plan_epoch, rank_share, steps_of
from train.loss import (cosine_lr, effective_sample_size, flat_pear_weights, token_logprobs, token_weights,
                        weighted_nll)
from train.sft import (ResponseLogprobs, SFTConfig, StepStats, learning_summary, micro_batch_loss, schedule,
                       step_batches, step_metrics)

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def rows_of(seqs, prompt_lens, target=None, behavior=None, weights=None) -> Rows:
    r = [len(x) - p for x, p in zip(seqs, prompt_lens)]
    pick = lambda v, k: [np.asarray(v[i] if v else np.full(r[i], k), np.float32) for i in range(len(seqs))]
    return Rows([f"r{i}" for i in range(len(seqs))], [np.asarray(x, np.int64) for x in seqs],
                np.asarray(prompt_lens, np.int64), pick(target, -1.0), pick(behavior, -1.0), pick(weights, 1.0))


def tiny_llama(vocab=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


# ---- the loss --------------------------------------------------------------------------------

def test_weighted_nll_by_hand():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    w = torch.tensor([1.0, 0.5, 2.0])
    # (1*1 + 0.5*2 + 2*0.5) / 3 = 1.0
    assert_close(weighted_nll(lp, w, 3), torch.tensor(1.0))
    # the denominator is the global token count, not this tensor's length
    assert_close(weighted_nll(lp, w, 6), torch.tensor(0.5))


def test_weights_are_stop_gradient():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    w = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
    weighted_nll(lp, w, 4).backward()
    assert w.grad is None
    assert_close(lp.grad, -torch.tensor([1.0, 0.5, 2.0]) / 4)


def test_chunked_logprobs_equal_full_softmax_values_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, requires_grad=True)
    head = torch.randn(11, 5, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    ref = torch.log_softmax(hidden @ head.T, -1)[torch.arange(7), labels]
    ref.sum().backward()
    g_ref = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    got = token_logprobs(hidden, head, labels, chunk_size=3)  # chunks of 3, 3, 1
    got.sum().backward()
    assert_close(got, ref)
    assert_close((hidden.grad, head.grad), g_ref)


def test_uniform_weighting_is_cross_entropy_on_response_tokens():
    """Through the model: uniform weights = HF logits + F.cross_entropy over the response tokens only."""
    lm = tiny_llama()
    seqs = [[3, 4, 5, 6, 7, 8], [3, 9, 10], [11, 12, 13, 14]]
    plens = [2, 1, 3]
    batch = collate(rows_of(seqs, plens), [0, 1, 2])
    loss, stats = micro_batch_loss(ResponseLogprobs(lm, chunk=4), batch, "uniform", None, batch.num_tokens,
                                   NO_AUTOCAST)
    logits, labels = [], []
    for x, p in zip(seqs, plens):  # one unpadded row at a time: padding cannot leak in
        out = lm(input_ids=torch.tensor([x])).logits[0]  # (L, V)
        logits.append(out[p - 1 : len(x) - 1])
        labels.append(torch.tensor(x[p:]))
    ref = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    assert batch.num_tokens == 4 + 2 + 1
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    stats = StepStats.from_tensor(stats)
    assert stats.nll / stats.tokens == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)  # logged loss = objective here
    assert stats.weight == stats.tokens == 7  # mean weight 1
    assert stats.real_tokens == 6 + 3 + 4


def test_split_over_two_ranks_sums_to_the_single_rank_loss_and_gradient():
    torch.manual_seed(1)
    lp = torch.randn(10).clamp(max=-0.01)
    w = torch.rand(10) * 2
    full_lp = lp.clone().requires_grad_()
    full = weighted_nll(full_lp, w, 10)
    full.backward()
    # unequal shares (3 and 7 tokens): normalising by the global count makes the sum exact
    parts_lp = [lp[:3].clone().requires_grad_(), lp[3:].clone().requires_grad_()]
    parts = [weighted_nll(x, w[s], 10) for x, s in zip(parts_lp, (slice(0, 3), slice(3, 10)))]
    for part in parts:
        part.backward()
    assert_close(parts[0] + parts[1], full)
    assert_close(torch.cat([x.grad for x in parts_lp]), full_lp.grad)
    # a per-rank mean, averaged over ranks, would not be the same loss
    naive = (weighted_nll(lp[:3], w[:3], 3) + weighted_nll(lp[3:], w[3:], 7)) / 2
    assert not torch.allclose(naive, full)


def test_effective_sample_size():
    ess = lambda w: effective_sample_size(sum(w), sum(x * x for x in w))
    assert ess([0.3] * 5) == pytest.approx(5.0)
    assert ess([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert ess([1.0, 1.0, 0.0, 0.0]) == pytest.approx(2.0)
    assert ess([1.0, 2.0, 3.0]) == pytest.approx(36 / 14)
    assert ess([0.0, 0.0]) == 0.0


# ---- weights ---------------------------------------------------------------------------------

def test_flat_pear_weights_by_hand():
    """Token variant, gamma 1, no clipping: log G[t] = sum of the deltas after t."""
    params = WeightParams("token", gamma=1.0, delta_clip=(-10, 10), log_weight_clip=(-10, 10))
    # row 0: deltas 0.1, 0.2, -0.05; row 1: 0.3, 0.1 (tokens held flat, row after row)
    target = torch.tensor([-1.0, -1.0, -1.0, -2.0, -2.0])
    behavior = target - torch.tensor([0.1, 0.2, -0.05, 0.3, 0.1])
    rows, pos = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1])
    w = flat_pear_weights(target, behavior, rows, pos, 2, params)
    assert_close(w, torch.tensor([0.15, -0.05, 0.0, 0.1, 0.0]).exp())


def test_flat_pear_weights_equal_the_left_aligned_layout():
    torch.manual_seed(2)
    lens = [4, 1, 3]
    tgt, beh = -torch.rand(8), -torch.rand(8)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    pos = torch.cat([torch.arange(n) for n in lens])
    params = WeightParams("block", block_size=2)
    T = max(lens)
    t2, b2 = torch.zeros(3, T), torch.zeros(3, T)
    mask = torch.zeros(3, T, dtype=torch.bool)
    t2[rows, pos], b2[rows, pos], mask[rows, pos] = tgt, beh, True
    ref = pear_weights(t2, b2, mask, params)[rows, pos]
    assert_close(flat_pear_weights(tgt, beh, rows, pos, 3, params), ref)


def test_token_weights_per_weighting():
    params = WeightParams("sequence", delta_clip=(-10, 10), log_weight_clip=(-10, 10))
    batch = collate(rows_of([[1, 2, 3, 4], [1, 5, 6]], [2, 1], target=[[-1.0, -1.0], [-1.0, -1.0]],
                            behavior=[[-1.5, -1.0], [-1.0, -1.2]], weights=[[7.0, 7.0], [9.0, 9.0]]), [0, 1])
    model_lp = torch.tensor([-2.0, -1.0, -0.5, -1.0], requires_grad=True)  # the current model's logprobs
    assert_close(token_weights("uniform", batch, model_lp, None), torch.ones(4))
    assert_close(token_weights("pear", batch, model_lp, None), torch.tensor([7.0, 7.0, 9.0, 9.0]))
    # recomputed from the stored logprobs: sequence log G = sum of row deltas (0.5 and 0.2)
    assert_close(token_weights("pear", batch, model_lp, params), torch.tensor([0.5, 0.5, 0.2, 0.2]).exp())
    # live: deltas from the model's logprobs (-0.5, 0 and 0.5, 0.2), no gradient through them
    live = token_weights("pear-live", batch, model_lp, params)
    assert not live.requires_grad
    assert_close(live, torch.tensor([-0.5, -0.5, 0.7, 0.7]).exp())


# ---- batching --------------------------------------------------------------------------------

def test_collate_scores_only_response_tokens():
    batch = collate(rows_of([[5, 6, 7, 8], [5, 9]], [2, 1]), [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch.rows.tolist() == [0, 0, 1]
    assert batch.cols.tolist() == [1, 2, 0]  # the position before each response token
    assert batch.labels.tolist() == [7, 8, 9]  # never a pad
    assert batch.resp_pos.tolist() == [0, 1, 0]
    assert batch.real_tokens == 6 and batch.num_tokens == 3


def test_idle_batch_contributes_nothing():
    lm = tiny_llama()
    loss, stats = micro_batch_loss(ResponseLogprobs(lm, 4), idle_batch(), "uniform", None, 10, NO_AUTOCAST)
    loss.backward()
    assert loss.item() == 0.0 and stats.abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lm.parameters())


def test_plan_epoch_covers_every_row_once_under_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=200)
    lengths[17] = 300  # longer than the budget: alone in its micro-batch
    plan = plan_epoch(lengths, 256, seed=3, epoch=0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(200))
    for mb in plan:
        assert len(mb) == 1 or len(mb) * lengths[mb].max() <= 256
    assert [m.tolist() for m in plan] == [m.tolist() for m in plan_epoch(lengths, 256, seed=3, epoch=0)]
    assert [m.tolist() for m in plan] != [m.tolist() for m in plan_epoch(lengths, 256, seed=3, epoch=1)]
    # the same number of micro-batches every epoch (the step count is known up front)
    assert len({len(plan_epoch(lengths, 256, 3, e)) for e in range(5)}) == 1
    # length bucketing: little padding
    padded = sum(len(mb) * lengths[mb].max() for mb in plan)
    assert padded < 1.15 * lengths.sum()


def test_steps_and_rank_shares():
    steps = steps_of(7, 3)
    assert [list(s) for s in steps] == [[0, 1, 2], [3, 4, 5], [6]]
    assert rank_share(steps[0], 0, 2) == [0, 2] and rank_share(steps[0], 1, 2) == [1]
    assert rank_share(steps[2], 1, 2) == []  # this rank runs an idle micro-batch


def test_heldout_split_is_deterministic():
    ids = [f"row-{i}" for i in range(4000)]
    held = [is_heldout(i, 0.1) for i in ids]
    assert held == [is_heldout(i, 0.1) for i in ids]
    assert 0.08 < sum(held) / len(ids) < 0.12
    assert not any(is_heldout(i, 0.0) for i in ids)


def test_cosine_schedule():
    lrs = [cosine_lr(s, 20, 4, 1.0, 0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert cosine_lr(20, 20, 4, 1.0, 0.1) == pytest.approx(0.1)


def test_step_stats_and_metrics_by_hand():
    """Four response tokens, NLL 1, 2, 3, 4 under weights 1, 1, 2, 0: the step's sums and its metrics line."""
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    batch = collate(rows_of([[3, 4, 5, 6, 7], [3, 4]], [2, 1]), [0, 1])  # 3 + 1 response tokens of 7
    stats = StepStats.from_tensor(StepStats.tensor(nll, w, batch))
    assert stats == StepStats(nll=10.0, weighted_nll=9.0, weight=4.0, weight_sq=6.0, tokens=4.0, real_tokens=7.0)
    m = step_metrics(stats, 0.5, step=2, epoch=1.5, lr=1e-5, seconds=2.0)
    assert (m["step"], m["epoch"], m["loss"], m["weighted_loss"], m["mean_weight"]) == (3, 1.5, 2.5, 2.25, 1.0)
    assert m["ess"] == pytest.approx(16 / 6) and m["ess_fraction"] == pytest.approx(16 / 6 / 4)
    assert (m["response_tokens"], m["tokens"], m["tokens_per_s"], m["grad_norm"]) == (4, 7, 3.5, 0.5)


def test_learning_summary_of_two_epochs_by_hand():
    line = lambda epoch, loss, tokens, weight, ess: {"epoch": epoch, "loss": loss, "weighted_loss": loss + 0.5,
                                                     "response_tokens": tokens, "mean_weight": weight,
                                                     "ess_fraction": ess}
    steps = [line(0.5, 4.0, 10, 1.0, 1.0), line(1.0, 3.0, 30, 2.0, 0.5),
             line(1.5, 2.0, 10, 1.0, 0.8), line(2.0, 1.0, 30, 1.0, 0.7)]
    s = learning_summary(steps, 5.0, 2.5)
    assert (s["final_loss"], s["final_weighted_loss"], s["heldout_nll_start"], s["heldout_nll"]) == (1.0, 1.5, 5.0, 2.5)
    assert s["last_epoch_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)  # the second epoch, per token
    assert s["mean_weight"] == pytest.approx((10 + 60 + 10 + 30) / 80)
    assert s["mean_ess_fraction"] == pytest.approx(0.75)
    assert learning_summary([], None, None)["final_loss"] is None


def test_step_batches_share_each_step_over_the_ranks():
    """Two ranks: between them every micro-batch of the epoch once, as many per rank in each step (an
    idle one fills a short share), the step's response tokens known to both; a resumed run (from step 2)
    gets the same step 2."""
    lengths = (5, 9, 3, 7, 4, 6, 8, 2, 5)
    rows = rows_of([[k] * n for k, n in enumerate(lengths, start=1)], [1] * len(lengths))
    cfg = SFTConfig(token_budget=10, micro_batches=3)
    per_epoch, total, _ = schedule(cfg, rows.lengths)
    assert (len(plan_epoch(rows.lengths, 10, 0, 0)), per_epoch, total) == (7, 3, 3)  # steps of 3, 3 and 1
    ranks = [list(itertools.islice(step_batches(rows, cfg, per_epoch, 0, rank, 2), per_epoch)) for rank in (0, 1)]
    for (epoch0, b0, tokens0), (epoch1, b1, tokens1) in zip(*ranks):
        assert epoch0 == epoch1 and tokens0 == tokens1 and len(b0) == len(b1)
        assert tokens0 == sum(b.num_tokens for b in b0 + b1)
    assert ranks[0][-1][0] == 1.0  # the last step ends the epoch
    assert sum(t for _, _, t in ranks[0]) == rows.response_lengths.sum()
    assert sum(not b.idle for r in ranks for _, bs, _ in r for b in bs) == 7
    _, resumed, _ = next(step_batches(rows, cfg, per_epoch, 2, 0, 2))
    assert [b.input_ids.tolist() for b in resumed] == [b.input_ids.tolist() for b in ranks[0][2][1]]
