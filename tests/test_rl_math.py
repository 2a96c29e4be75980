"""RL loss math on hand-sized tensors with hand-computed answers."""
import math

import pytest
import torch

import numpy as np

from train.rl_math import (aggregate, aggregation_normaliser, clipped_policy_loss, group_advantages, kl_k3,
                           micro_batches, rl_loss, tis_weights)

T = torch.tensor


# ---- group advantages ------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = T([[1.0, 0.0, 0.0, 1.0],
                 [1.0, 1.0, 1.0, 1.0],
                 [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards, "std")
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.866025
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv[0], T([s, -s, -s, s]), atol=1e-5, rtol=0)
    # group 1: all equal, nothing to learn
    torch.testing.assert_close(adv[1], torch.zeros(4))
    # group 2: mean 0.75, std sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5
    torch.testing.assert_close(adv[2], T([-0.5, -0.5, -0.5, 1.5]), atol=1e-5, rtol=0)


def test_group_advantages_unscaled_and_edge_cases():
    rewards = T([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards, "none"),
                               T([[0.5, -0.5, -0.5, 0.5], [-0.75, -0.75, -0.75, 2.25]]))
    # one sample per prompt: no group to compare with, advantage 0 (not NaN)
    torch.testing.assert_close(group_advantages(T([[1.0], [0.0]]), "std"), torch.zeros(2, 1))
    # advantages sum to zero within every group
    adv = group_advantages(torch.rand(5, 8), "std")
    torch.testing.assert_close(adv.sum(-1), torch.zeros(5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        group_advantages(rewards, "minmax")


# ---- aggregation -----------------------------------------------------------------------------

def test_aggregate_token_and_sequence():
    values = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()  # third response is empty
    # token: every response token weighs the same -> (1 + 2 + 3 + 4) / 4
    assert aggregate(values, mask, "token").item() == pytest.approx(2.5)
    # sequence: every non-empty response weighs the same -> (mean(1, 2, 3) + 4) / 2
    assert aggregate(values, mask, "sequence").item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        aggregate(values, mask, "batch")


def test_micro_batch_aggregates_add_up_to_the_whole_batch_by_hand():
    """Cut into rows {0, 2} and {1}: each part divided by the whole batch's normaliser."""
    values = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = T([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()
    assert aggregation_normaliser(mask, "token") == 4.0  # response tokens
    assert aggregation_normaliser(mask, "sequence") == 2.0  # responses with a token (the empty one does not count)
    parts = [[0, 2], [1]]
    # token: (1 + 2 + 3) / 4 + 4 / 4
    got = [aggregate(values[r], mask[r], "token", aggregation_normaliser(mask, "token")).item() for r in parts]
    assert got == pytest.approx([1.5, 1.0]) and sum(got) == pytest.approx(aggregate(values, mask, "token").item())
    # sequence: mean(1, 2, 3) / 2 + 4 / 2
    got = [aggregate(values[r], mask[r], "sequence", aggregation_normaliser(mask, "sequence")).item() for r in parts]
    assert got == pytest.approx([1.0, 2.0]) and sum(got) == pytest.approx(aggregate(values, mask, "sequence").item())
    with pytest.raises(ValueError):
        aggregation_normaliser(mask, "batch")


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_rl_loss_over_micro_batches_is_the_batch_loss_and_gradient(aggregation):
    """Losses of a cut batch, each with the whole batch's normaliser: summed, the batch's loss and
    gradient (KL term and TIS weights included)."""
    g = torch.Generator().manual_seed(0)
    B, Tn = 7, 5
    lengths = T([5, 1, 3, 0, 4, 2, 5])
    mask = torch.arange(Tn)[None, :] < lengths[:, None]  # (B, T), one empty response
    lp = (-torch.rand(B, Tn, generator=g) * 3).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(B, Tn, generator=g)
    ref = lp.detach() + 0.3 * torch.randn(B, Tn, generator=g)
    tis = torch.rand(B, Tn, generator=g) + 0.5
    adv = torch.randn(B, generator=g)
    args = (0.2, 0.28, aggregation)
    whole, _ = rl_loss(lp, old, adv, mask, *args, tis, 0.1, ref)
    (whole_grad,) = torch.autograd.grad(whole, lp)
    norm = aggregation_normaliser(mask, aggregation)
    total = 0.0
    for r in ([0, 3], [1, 5, 6], [2], [4]):
        r = torch.tensor(r)
        total = total + rl_loss(lp[r], old[r], adv[r], mask[r], *args, tis[r], 0.1, ref[r], norm)[0]
    (parts_grad,) = torch.autograd.grad(total, lp)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts_grad, whole_grad, atol=1e-7, rtol=0)
    assert whole_grad.abs().max() > 1e-2  # not vacuous


def test_micro_batches_pack_by_length_under_the_budget():
    lengths = np.array([90, 12, 94, 40, 41, 94, 13, 60, 90, 11])
    batches = micro_batches(lengths, 200)
    assert sorted(int(i) for b in batches for i in b) == list(range(10))  # every row once
    assert all(len(b) * lengths[b].max() <= 200 for b in batches)  # rows x longest row within the budget
    # packed by length: the micro-batches hold runs of the sorted lengths, so padding stays small
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
    # greedy over the sorted lengths: [11, 12, 13, 40] (4 x 40), [41, 60], [90, 90], [94, 94]
    assert sorted(sorted(lengths[b].tolist()) for b in batches) == [[11, 12, 13, 40], [41, 60], [90, 90], [94, 94]]
    # the smallest budget allowed, the longest row: the long rows go one at a time
    tight = micro_batches(lengths, 94)
    assert all(len(b) * lengths[b].max() <= 94 for b in tight)
    assert all(len(b) == 1 for b in tight if lengths[b].max() > 94 / 2)
    # 0: the whole batch in one pass, in order
    assert [b.tolist() for b in micro_batches(lengths, 0)] == [list(range(10))]


# ---- clipped policy loss ---------------------------------------------------------------------

def test_clipped_loss_1x3_by_hand():
    ratio = T([[0.5, 1.0, 1.5]])
    old = torch.zeros(1, 3)
    lp = ratio.log().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)

    # A = +1: per token max(-r, -clip(r, 0.8, 1.2)) = [-0.5, -1.0, -1.2]
    loss, stats = clipped_policy_loss(lp, old, T([1.0]), mask, 0.2, 0.2, "token")
    assert loss.item() == pytest.approx((-0.5 - 1.0 - 1.2) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)  # only r = 1.5 is clipped
    assert stats["ratio_max"].item() == pytest.approx(1.5) and stats["ratio_min"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dlp of -A r / 3 is -r / 3; the clipped token gets no gradient
    torch.testing.assert_close(lp.grad, T([[-0.5 / 3, -1.0 / 3, 0.0]]))

    # A = -1: per token max(r, clip(r)) = [0.8, 1.0, 1.5]; now r = 0.5 is the clipped one
    loss, stats = clipped_policy_loss(lp, old, T([-1.0]), mask, 0.2, 0.2, "token")
    assert loss.item() == pytest.approx((0.8 + 1.0 + 1.5) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)

    # clip-higher: the upper bound moves to 1.28
    loss, _ = clipped_policy_loss(lp, old, T([1.0]), mask, 0.2, 0.28, "token")
    assert loss.item() == pytest.approx((-0.5 - 1.0 - 1.28) / 3)


def test_clipped_loss_token_weights_and_sequence_aggregation():
    lp = T([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # on-policy: ratio 1, the loss is -A per token
    old = torch.zeros(2, 3)
    mask = T([[1, 1, 1], [1, 0, 0]]).bool()
    adv = T([1.0, -2.0])
    w = T([[1.0, 0.5, 2.0], [3.0, 1.0, 1.0]])  # e.g. TIS weights
    # token: (-1 - 0.5 - 2 + 6) / 4
    loss, stats = clipped_policy_loss(lp, old, adv, mask, 0.2, 0.2, "token", token_weights=w)
    assert loss.item() == pytest.approx(2.5 / 4)
    # sequence: (mean(-1, -0.5, -2) + 6) / 2
    loss, _ = clipped_policy_loss(lp, old, adv, mask, 0.2, 0.2, "sequence", token_weights=w)
    assert loss.item() == pytest.approx((-3.5 / 3 + 6.0) / 2)
    assert stats["approx_kl"].item() == 0.0 and stats["clip_fraction"].item() == 0.0


def test_on_policy_gradient_is_reinforce():
    """At ratio 1 the clipped loss has the policy gradient -A * grad(lp) / tokens."""
    lp = T([[-1.0, -2.0], [-0.5, -0.1]]).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, _ = clipped_policy_loss(lp, lp.detach(), T([2.0, -1.0]), mask)
    loss.backward()
    torch.testing.assert_close(lp.grad, T([[-0.5, -0.5], [0.25, 0.25]]))


# ---- KL and TIS ------------------------------------------------------------------------------

def test_kl_k3_by_hand_and_against_exact_kl():
    # d = ref - lp = log 2: exp(d) - d - 1 = 1 - log 2
    assert kl_k3(T([0.0]), T([math.log(2)])).item() == pytest.approx(1 - math.log(2))
    assert kl_k3(T([-1.3]), T([-1.3])).item() == 0.0
    # on samples of p, the mean of k3 estimates KL(p || q)
    p, q = T([0.7, 0.2, 0.1]), T([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = kl_k3(p.log()[x], q.log()[x]).mean().item()
    assert est == pytest.approx(exact, abs=0.005)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_tis_weights_by_hand():
    old = T([[0.5, 0.2, 0.9]]).log()
    sampling = T([[0.25, 0.4, 0.3]]).log()
    # pi_old / pi_engine = [2, 0.5, 3]; cap 2 truncates the last one only
    torch.testing.assert_close(tis_weights(old, sampling, 2.0), T([[2.0, 0.5, 2.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(tis_weights(old, sampling, 10.0), T([[2.0, 0.5, 3.0]]), atol=1e-6, rtol=0)
    # identical engines: weight 1 everywhere, and no gradient flows through the weights
    lp = T([[-0.3, -2.0]]).requires_grad_(True)
    w = tis_weights(lp, lp.detach(), 2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.ones(1, 2))
    with pytest.raises(ValueError):
        tis_weights(old, sampling, 0.0)


def test_tis_weights_change_the_loss_but_not_on_policy_direction():
    """A token the engine over-sampled (weight < 1) contributes less to the update."""
    lp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = tis_weights(T([[0.0, 0.0]]), T([[0.0, math.log(4.0)]]), 2.0)  # second token: weight 1/4
    loss, _ = clipped_policy_loss(lp, lp.detach(), T([1.0]), mask, token_weights=w)
    loss.backward()
    torch.testing.assert_close(lp.grad, T([[-0.5, -0.125]]))
