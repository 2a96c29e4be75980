"""PEAR weight math on hand-computed examples (the definitions in scorer/weights.py)."""
import math

import pytest
import torch

from scorer.weights import WeightParams, log_weights_from_delta, pear_log_weights, pear_weights, ragged_weights

# One 5-token response. Raw deltas: 0.05, -0.5, 0.4, 0.0, -0.6
# clipped to [-0.08, 0.3]:          0.05, -0.08, 0.3, 0.0, -0.08   (sum 0.19)
TARGET = [-1.0, -2.0, -0.5, -3.0, -1.0]
BEHAVIOR = [-1.05, -1.5, -0.9, -3.0, -0.4]
LG = math.log(0.9)


def log_g(variant, gamma=0.9, block_size=4, log_weight_clip=(-10.0, 5.0), target=TARGET, behavior=BEHAVIOR):
    p = WeightParams(variant, gamma, block_size, (-0.08, 0.3), log_weight_clip)
    mask = torch.ones(1, len(target), dtype=torch.bool)
    out = pear_log_weights(torch.tensor([target]), torch.tensor([behavior]), mask, p)
    return out[0].tolist()


def test_sequence_variant_gives_every_token_the_clipped_sum():
    assert log_g("sequence") == pytest.approx([0.19] * 5, abs=1e-6)


def test_token_variant_is_discounted_suffix_ratio_excluding_the_token_itself():
    expected = [
        4 * LG + (-0.08 + 0.3 + 0.0 - 0.08),  # t=1: future = tokens 2..5
        3 * LG + (0.3 + 0.0 - 0.08),          # t=2
        2 * LG + (0.0 - 0.08),                # t=3
        1 * LG + (-0.08),                     # t=4
        0.0,                                  # t=5: no future
    ]
    assert log_g("token") == pytest.approx(expected, abs=1e-6)


def test_block_variant_with_blocks_of_two():
    # blocks {1,2} end at 2, {3,4} end at 4, {5} ends at 5; rho = (-0.03, 0.3, -0.08)
    expected = [3 * LG + 0.3 - 0.08] * 2 + [1 * LG - 0.08] * 2 + [0.0]
    assert log_g("block", block_size=2) == pytest.approx(expected, abs=1e-6)


def test_block_of_one_equals_token_variant():
    g = torch.Generator().manual_seed(0)
    t, b = -torch.rand(3, 9, generator=g) * 3, -torch.rand(3, 9, generator=g) * 3
    mask = torch.arange(9)[None] < torch.tensor([[9], [4], [1]])
    tok = pear_log_weights(t, b, mask, WeightParams("token", 0.97, 4))
    blk = pear_log_weights(t, b, mask, WeightParams("block", 0.97, 1))
    torch.testing.assert_close(tok, blk)


def test_block_longer_than_response_equals_sequence_ratio_minus_own_block():
    # one block covering all 5 tokens: nothing comes after it, so log G = 0 everywhere
    assert log_g("block", block_size=8) == pytest.approx([0.0] * 5, abs=1e-9)


def test_none_variant_is_uniform():
    assert log_g("none") == [0.0] * 5


def test_delta_clip_both_bounds():
    # raw deltas +2 and -2 clip to +0.3 and -0.08
    assert log_g("sequence", target=[0.0, -2.0], behavior=[-2.0, 0.0]) == pytest.approx([0.22, 0.22], abs=1e-6)


def test_log_weight_clip_both_bounds():
    assert log_g("sequence", log_weight_clip=(-0.1, 0.1)) == pytest.approx([0.1] * 5, abs=1e-9)
    low = log_g("token", gamma=0.5, log_weight_clip=(-1.0, 5.0))  # 4 ln 0.5 + 0.14 = -2.63 -> -1
    assert low[0] == pytest.approx(-1.0)
    assert low[-1] == pytest.approx(0.0)


def test_single_token_response():
    for variant in ("sequence", "token", "block"):
        lg = log_g(variant, target=[-1.0], behavior=[-0.5])
        assert lg == pytest.approx([-0.08] if variant == "sequence" else [0.0], abs=1e-6)


def test_ragged_rows_match_one_row_at_a_time_and_empty_rows_are_empty():
    p = WeightParams("block", 0.99, 3)
    rows_t = [TARGET, [], TARGET[:2]]
    rows_b = [BEHAVIOR, [], BEHAVIOR[:2]]
    w, lw = ragged_weights(rows_t, rows_b, p)
    assert [len(x) for x in w] == [5, 0, 2]
    for i in (0, 2):
        alone, _ = ragged_weights([rows_t[i]], [rows_b[i]], p)
        assert alone[0].tolist() == pytest.approx(w[i].tolist(), abs=1e-7)
    assert w[0].tolist() == pytest.approx([math.exp(x) for x in lw[0]], rel=1e-6)


def test_weights_are_exp_and_zero_outside_response():
    mask = torch.tensor([[True, True, True, False]])
    t, b = torch.tensor([[-1.0, -1.0, -1.0, -9.0]]), torch.tensor([[-1.1, -0.9, -1.0, 0.0]])
    w = pear_weights(t, b, mask, WeightParams("sequence"))
    assert w[0, 3] == 0
    torch.testing.assert_close(w[0, :3], torch.full((3,), math.exp(0.1 - 0.08 + 0.0)))


@pytest.mark.parametrize("bad", [dict(variant="tokens"), dict(gamma=0.0), dict(block_size=0),
                                 dict(delta_clip=(0.3, -0.08))])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        WeightParams(**bad)


def test_the_discount_is_computed_in_float64():
    T = 20_001
    delta = torch.zeros(1, T, dtype=torch.float64)
    mask = torch.ones(1, T, dtype=torch.bool)
    log_g = log_weights_from_delta(delta, mask, "token", gamma=0.999, log_weight_clip=(-1e9, 1e9))
    assert log_g.dtype == torch.float64
    assert log_g[0, 0].item() == (T - 1) * math.log(0.999)  # float32 would be off by about 1e-6 here
