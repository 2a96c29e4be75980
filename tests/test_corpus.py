"""Turning corpus rows into token ids, and refusing rows that cannot be scored."""

import numpy as np
import pytest

from scorer.corpus import RowError, derive_id, encode_row

KW = dict(max_len=512, truncate=False, append_eos=True, vocab_size=10_000)


def encode(row, tokenizer, **kw):
    return encode_row(row, 0, "test", tokenizer, **{**KW, **kw})


def test_prompt_response_uses_chat_template_and_ends_with_eos(tokenizer):
    ex = encode({"prompt": "What is 1 + 2?", "response": "1+2=3\nAnswer: 3"}, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ex.input_ids[: ex.prompt_len] == list(prompt)
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=True) == "1+2=3\nAnswer: 3"
    assert ex.behavior_logprobs is None


def test_messages_with_one_assistant_turn_score_like_prompt_response(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ex = encode({"messages": msgs}, tokenizer)
    same = encode({"prompt": "2+2?", "response": "4"}, tokenizer)
    assert ex.input_ids[ex.prompt_len:] == same.input_ids[same.prompt_len:]
    assert ex.prompt_len > same.prompt_len  # the system turn is part of the prompt
    with pytest.raises(RowError, match="no assistant turn"):
        encode({"messages": msgs[:2]}, tokenizer)


def test_every_assistant_turn_is_a_span_of_the_templated_conversation(tokenizer):
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4"}]
    ex = encode({"messages": msgs, "behavior_logprobs": [-0.5] * 4}, tokenizer)
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(ex.input_ids) == text  # the template's text, nothing added or lost
    assert [tokenizer.decode(ex.input_ids[a:b]) for a, b in ex.spans] == ["2<|end|>", "4<|end|>"]
    assert ex.prompt_len == ex.spans[0][0] and len(ex.response_positions) == 4
    with pytest.raises(RowError, match="3 values for 4 response tokens"):
        encode({"messages": msgs, "behavior_logprobs": [-0.5] * 3}, tokenizer)


def test_response_ids_are_used_as_given_even_when_not_canonical(tokenizer):
    # "12" spelled as two single-character tokens instead of the tokenizer's own choice
    ids = [tokenizer.convert_tokens_to_ids(c) for c in "12"] + [tokenizer.eos_token_id]
    ex = encode({"prompt": "q", "response": "12", "response_ids": ids, "behavior_logprobs": [-0.1, -0.2, -0.3]},
                tokenizer)
    assert ex.input_ids[ex.prompt_len:] == ids
    assert ex.behavior_logprobs.tolist() == pytest.approx([-0.1, -0.2, -0.3])


def test_response_ids_that_spell_other_text_are_rejected(tokenizer):
    ids = tokenizer("13", add_special_tokens=False)["input_ids"]
    with pytest.raises(RowError) as e:
        encode({"prompt": "q", "response": "12", "response_ids": ids}, tokenizer)
    assert e.value.field == "response_ids" and "'3'" in e.value.reason


@pytest.mark.parametrize("row, field, words", [
    ({"response": "x"}, "prompt", "missing"),
    ({"prompt": "q"}, "response", "missing"),
    ({"prompt": "q", "response": "  "}, "response", "empty"),
    ({"foo": 1}, "prompt", "neither"),
    ({"prompt": "q", "response": "ab", "behavior_logprobs": [-0.1]}, "behavior_logprobs", "values for"),
    ({"prompt": "q", "response": "ab", "behavior_logprobs": [-0.1, float("nan"), -0.1]}, "behavior_logprobs",
     "non-finite"),
    ({"prompt": "q", "response": "ab", "behavior_logprobs": [-0.1, 0.5, -0.1]}, "behavior_logprobs", "positive"),
    ({"prompt": "q", "response": " ".join(str(i) for i in range(600))}, "response", "exceed max_len"),
    ({"prompt": "q", "response_ids": [5, 99_999]}, "response_ids", "outside the model's vocabulary"),
    ({"messages": [{"role": "user"}]}, "messages", "role and a string content"),
])
def test_bad_rows_name_the_field_and_reason(tokenizer, row, field, words):
    with pytest.raises(RowError) as e:
        encode(row, tokenizer)
    assert e.value.field == field and words in e.value.reason


def test_truncation_only_when_asked_and_cuts_behavior_logprobs_too(tokenizer):
    n = len(tokenizer("a " * 100, add_special_tokens=False)["input_ids"]) + 1
    row = {"prompt": "q", "response": "a " * 100, "behavior_logprobs": [-0.5] * n}
    with pytest.raises(RowError):
        encode(row, tokenizer, max_len=40)
    ex = encode(row, tokenizer, max_len=40, truncate=True)
    assert len(ex.input_ids) == 40
    assert len(ex.behavior_logprobs) == 40 - ex.prompt_len


def test_ids_are_kept_or_derived_stably(tokenizer):
    assert encode({"id": 7, "prompt": "q", "response": "a"}, tokenizer).id == "7"
    a = encode({"prompt": "q", "response": "a"}, tokenizer).id
    assert (a == encode({"prompt": "q", "response": "a", "other": 1}, tokenizer).id
            == derive_id({"prompt": "q", "response": "a"}))
    assert a != encode({"prompt": "q", "response": "b"}, tokenizer).id


def test_behavior_logprobs_become_float32(tokenizer):
    n = len(tokenizer("ab", add_special_tokens=False)["input_ids"]) + 1
    ex = encode({"prompt": "q", "response": "ab", "behavior_logprobs": np.full(n, -0.25)}, tokenizer)
    assert ex.behavior_logprobs.dtype == np.float32
