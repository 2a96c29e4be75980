"""TorchScorer: every option gives the logprobs of a plain unbatched transformers forward.

A tiny random Llama in float32, sequences of mixed lengths and prompt lengths at the edges: a
prompt of one token (everything scored), responses of one token, an empty response, and a
sequence longer than the token budget.
"""
import gc
import weakref

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.batching import packed_batches
from scorer.engines import TorchScorer, packed_attention, token_logprobs

VOCAB = 300
# (length, prompt_len): response = input_ids[prompt_len:]
CASES = [(2, 1), (5, 4), (5, 1), (40, 10), (17, 16), (33, 2), (3, 3), (64, 63), (90, 1), (9, 4), (1, 1)]


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    input_ids = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n, _ in CASES]
    return input_ids, [p for _, p in CASES]


@pytest.fixture(scope="module")
def reference(data):
    """One sequence at a time, no batching, no padding: full logits and a float32 log_softmax."""
    model, (input_ids, prompt_lens) = tiny_llama(), data
    out = []
    with torch.no_grad():
        for ids, p in zip(input_ids, prompt_lens):
            x = torch.tensor([ids])  # (1, L)
            logits = model(input_ids=x).logits[0, :-1].float()  # (L-1, V): position t-1 predicts token t
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]  # (L-1,)
            out.append(lp[p - 1 :].numpy())
    return out


def assert_matches(got, reference, data):
    input_ids, prompt_lens = data
    assert [len(x) for x in got] == [len(ids) - p for ids, p in zip(input_ids, prompt_lens)]
    assert all(x.dtype == np.float32 for x in got)
    for x, y in zip(got, reference):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", ["padded", "packed"])
@pytest.mark.parametrize("upcast_logits", [True, False])
@pytest.mark.parametrize("token_budget,chunk_size", [(4096, 8192), (64, 7)])  # one batch; many batches, chunks
def test_options_match_unbatched_forward(data, reference, attention, upcast_logits, token_budget, chunk_size):
    scorer = TorchScorer(tiny_llama(), token_budget=token_budget, chunk_size=chunk_size, attention=attention,
                         upcast_logits=upcast_logits)
    assert_matches(scorer.score(*data), reference, data)


@pytest.mark.slow(seconds=30)  # torch.compile builds C++ kernels, slowest with an empty compile cache (CI)
@pytest.mark.parametrize("attention,upcast_logits", [("padded", True), ("packed", False)])
def test_compiled_matches_unbatched_forward(data, reference, attention, upcast_logits):
    scorer = TorchScorer(tiny_llama(), token_budget=64, chunk_size=7, attention=attention,
                         upcast_logits=upcast_logits, compile=True)
    assert_matches(scorer.score(*data), reference, data)
    assert_matches(scorer.score(*data), reference, data)  # a second pass on the compiled graphs


def test_model_loaded_from_a_path(tmp_path, data, reference):
    tiny_llama().save_pretrained(tmp_path)
    scorer = TorchScorer(str(tmp_path), device="cpu", token_budget=128)
    assert scorer.model.dtype == torch.float32
    assert_matches(scorer.score(*data), reference, data)
    model = weakref.ref(scorer.model)
    scorer.close()  # the model is released, not kept until the scorer goes
    gc.collect()
    assert model() is None


def test_chunked_logprobs_of_named_positions_equal_those_of_the_gathered_rows():
    """`positions` gathers the rows a chunk at a time: the same logprobs as gathering them first, and
    as a full log-softmax; no position gives an empty float32 tensor."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 5, generator=g)  # (M, D)
    head = torch.randn(11, 5, generator=g)  # (V, D)
    positions = torch.tensor([8, 0, 3, 3, 5, 1, 7])  # (N,) in any order, repeats allowed
    labels = torch.randint(0, 11, (7,), generator=g)
    got = token_logprobs(hidden, head, labels, chunk_size=3, positions=positions)  # chunks of 3, 3, 1
    assert torch.equal(got, token_logprobs(hidden[positions], head, labels, chunk_size=3))
    want = torch.log_softmax(hidden[positions] @ head.T, -1)[torch.arange(7), labels]
    torch.testing.assert_close(got, want)
    empty = token_logprobs(hidden, head, labels[:0], positions=positions[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_no_sequences_and_unknown_attention():
    assert TorchScorer(tiny_llama()).score([], []) == []
    with pytest.raises(ValueError, match="attention"):
        TorchScorer(tiny_llama(), attention="ragged")


def test_packed_attention_gives_the_model_its_own_attention_back():
    model = tiny_llama()
    before = model.config._attn_implementation
    with packed_attention(model):
        assert model.config._attn_implementation != before
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError), packed_attention(model):
        raise RuntimeError("a failing batch")
    assert model.config._attn_implementation == before


def test_packed_batches_fill_the_budget_in_length_order():
    # lengths sorted: idx 3 (2), 1 (3), 0 (5) fill 10 exactly; 2 (8) starts the next batch
    assert packed_batches([5, 3, 8, 2], 10) == [[3, 1, 0], [2]]
    assert packed_batches([20, 1], 10) == [[1], [0]]  # longer than the budget: a batch of its own
    assert packed_batches([], 10) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs CUDA")
def test_varlen_attention_matches_per_sequence_sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama()
    with packed_attention(model):
        attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    lens = [7, 1, 130, 64]
    cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, sum(lens), 64, generator=g)  # (1, H, M, d)
    k, v = (torch.randn(1, 2, sum(lens), 64, generator=g) for _ in range(2))  # (1, Hkv, M, d)
    want, _ = attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=max(lens))  # CPU
    got, _ = attention(None, *(x.cuda().bfloat16() for x in (q, k, v)), None, scaling=0.125,
                       cu_seq_lens_q=cu.cuda(), max_length_q=max(lens))
    assert got.shape == want.shape == (1, sum(lens), 4, 64)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
