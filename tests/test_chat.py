"""Conversations as the model sees them: real chat templates, every assistant turn a scored span."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from scorer.config import WeightConfig
from scorer.corpus import RowError, encode_row
from scorer.job import ScoreConfig, run
from scorer.shards import list_shards, spans_of
from tiny_tokenizers import TEMPLATES, tiny_tokenizer
from train.data import collate, load_rows

END_OF_TURN = {"qwen2_5": "<|im_end|>", "llama3": "<|eot_id|>", "llama3_1": "<|eot_id|>", "gemma2": "<end_of_turn>"}


def conversation(family: str) -> list[dict]:
    # gemma has no system role
    system = [] if family == "gemma2" else [{"role": "system", "content": "Answer briefly."}]
    return system + [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."},
                     {"role": "user", "content": "And 5 plus 5?"}, {"role": "assistant", "content": "It is 10."}]


def encode(row, tok, **kw):
    return encode_row(row, 0, "test", tok, **{**dict(max_len=4096, truncate=False, append_eos=True,
                                                   vocab_size=len(tok)), **kw})


@pytest.mark.parametrize("family", TEMPLATES)
def test_ids_are_the_template_and_spans_are_the_assistant_turns(family):
    tok = tiny_tokenizer(family)
    msgs = conversation(family)
    ex = encode({"messages": msgs}, tok)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert ex.input_ids == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    assert tok.decode(ex.input_ids) == text
    spans = [tok.decode(ex.input_ids[a:b]) for a, b in ex.spans]
    assert spans == [f"It is 5.{END_OF_TURN[family]}", f"It is 10.{END_OF_TURN[family]}"]
    scored = set(ex.response_positions.tolist())
    context = tok.decode([t for i, t in enumerate(ex.input_ids) if i not in scored])
    for m in msgs[:-1]:
        if m["role"] != "assistant":
            assert m["content"] in context  # system and user turns are context only


def test_llama3_turns_end_with_eot_not_the_tokenizers_eos():
    tok = tiny_tokenizer("llama3")
    ex = encode({"prompt": "What is 2 plus 3?", "response": "It is 5."}, tok)
    assert ex.input_ids[ex.spans[-1][1] - 1] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.convert_tokens_to_ids("<|end_of_text|>") not in ex.input_ids


def test_default_system_prompt_is_context():
    tok = tiny_tokenizer("qwen2_5")
    ex = encode({"prompt": "What is 2 plus 3?", "response": "It is 5."}, tok)
    assert "You are Qwen" in tok.decode(ex.input_ids[: ex.prompt_len])
    assert [tok.decode(ex.input_ids[a:b]) for a, b in ex.spans] == ["It is 5.<|im_end|>"]


def test_tool_calls_and_tool_results_go_through_the_template():
    tok = tiny_tokenizer("qwen2_5")
    tools = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "number"}, "b": {"type": "number"}}}}}]
    msgs = [{"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "It is 5."}]
    ex = encode({"messages": msgs, "tools": json.dumps(tools)}, tok)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    first, second = (tok.decode(ex.input_ids[a:b]) for a, b in ex.spans)
    assert first.startswith("<tool_call>") and '"name": "add"' in first and first.endswith("<|im_end|>")
    assert second == "It is 5.<|im_end|>"
    assert "<tool_response>\n5\n</tool_response>" in tok.decode(ex.input_ids[ex.spans[0][1]:ex.spans[1][0]])


@pytest.mark.parametrize("messages, words", [
    ([{"role": "assistant", "content": "hello"}], "chat template cannot render it"),  # Qwen: needs a first message
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": 3, "content": "hi"}], "role"),
])
def test_conversations_a_template_cannot_score_are_rejected_with_the_reason(messages, words):
    with pytest.raises(RowError) as e:
        encode({"messages": messages}, tiny_tokenizer("gemma2" if words.startswith("chat") else "qwen2_5"))
    assert e.value.field == "messages" and words in e.value.reason


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama that speaks the Qwen2.5 template's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("qwen-tiny")
    tok = tiny_tokenizer("qwen2_5", folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder, tok


def test_future_sums_run_over_later_turns_and_sft_trains_only_the_spans(chat_model, tmp_path):
    folder, tok = chat_model
    msgs = conversation("qwen2_5")
    n = len(encode({"messages": msgs}, tok).response_positions)
    first = len(encode({"messages": msgs[:3]}, tok).response_positions)  # tokens of the first assistant turn
    later_changed = [-6.5] * first + [-6.0] * (n - first)  # near the random model's own logprobs
    rows = [{"id": "a", "messages": msgs, "behavior_logprobs": [-6.5] * n},
            {"id": "b", "messages": msgs, "behavior_logprobs": later_changed}]
    with open(tmp_path / "chat.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "scores"
    run(ScoreConfig(data=str(tmp_path / "chat.jsonl"), out=str(out), target=str(folder), executor="local",
                    backend="torch", weights=WeightConfig("token", delta_clip=(-10.0, 10.0),
                                                          log_weight_clip=(-100.0, 100.0))), progress=False)
    table = pq.read_table(list_shards(out)[0])
    a, b = (dict(zip(table.column_names, r)) for r in zip(*[table.column(c).to_pylist() for c in table.column_names]))
    assert spans_of(table)[0] == encode({"messages": msgs}, tok).spans
    wa, wb = np.array(a["weights"]), np.array(b["weights"])
    # only the second turn's behavior logprobs differ, yet the first turn's weights move with them
    np.testing.assert_allclose(np.log(wa[:first]) - np.log(wb[:first]), 0.5 * (n - first), rtol=1e-4)
    assert np.allclose(a["target_logprobs"], b["target_logprobs"])

    loaded, _ = load_rows(out, len(tok))
    batch = collate(loaded, [0])
    scored = sorted(int(c) + 1 for c in batch.cols)
    assert scored == encode({"messages": msgs}, tok).response_positions.tolist()
    assert batch.labels.tolist() == [a["input_ids"][p] for p in scored]
    np.testing.assert_allclose(batch.weights.numpy(), wa)
