"""Turning corpus rows into token ids, and refusing rows that cannot be scored."""
import json

import numpy as np
import pytest

from scorer.corpus import RowError, derive_id, encode_row, list_inputs, read_rows

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


def test_messages_last_assistant_turn_is_the_response(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ex = encode({"messages": msgs}, tokenizer)
    same = encode({"prompt": "2+2?", "response": "4"}, tokenizer)
    assert ex.input_ids[ex.prompt_len:] == same.input_ids[same.prompt_len:]
    assert ex.prompt_len > same.prompt_len  # the system turn is part of the prompt
    with pytest.raises(RowError, match="not the assistant"):
        encode({"messages": msgs[:2]}, tokenizer)


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
    ({"prompt": "q", "response": "ab", "behavior_logprobs": [-0.1, float("nan"), -0.1]}, "behavior_logprobs", "non-finite"),
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
    assert a == encode({"prompt": "q", "response": "a", "other": 1}, tokenizer).id == derive_id({"prompt": "q", "response": "a"})
    assert a != encode({"prompt": "q", "response": "b"}, tokenizer).id


def test_inputs_as_file_folder_or_glob(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.jsonl", "a/y.parquet", "z.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in list_inputs(str(tmp_path))] == ["x.jsonl", "y.parquet", "z.jsonl"]
    assert [p.name for p in list_inputs(str(tmp_path / "*.jsonl"))] == ["z.jsonl"]
    assert [p.name for p in list_inputs(str(tmp_path / "z.jsonl"))] == ["z.jsonl"]
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "missing"))


def test_jsonl_rows_with_unreadable_lines(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{broken\n\n" + json.dumps([1]) + "\n"
                 + json.dumps({"prompt": "c", "response": "d"}) + "\n")
    rows, table, errors = read_rows(f, 0, 4)
    assert table is None
    assert [r is None for r in rows] == [False, True, True, False]
    assert [e["row"] for e in errors] == [1, 2]
    rows, _, errors = read_rows(f, 3, 4)
    assert rows == [{"prompt": "c", "response": "d"}] and not errors


def test_behavior_logprobs_become_float32(tokenizer):
    n = len(tokenizer("ab", add_special_tokens=False)["input_ids"]) + 1
    ex = encode({"prompt": "q", "response": "ab", "behavior_logprobs": np.full(n, -0.25)}, tokenizer)
    assert ex.behavior_logprobs.dtype == np.float32
