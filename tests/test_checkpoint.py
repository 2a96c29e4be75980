"""One checkpoint module for every trainer: atomic saves, the newest kept, resume only onto the same inputs."""
import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from common.config import ConfigError
from tiny_tokenizers import tiny_tokenizer
from train import checkpoint


def test_resume_only_onto_what_the_checkpoint_was_made_from(tmp_path):
    tok = tiny_tokenizer("qwen2_5")
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    made_from = {"lr": 1e-3, "data": "abc"}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, lm, tok, {"step": step, "made_from": made_from, "optimizer": {}}, keep=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    ckpt, state = checkpoint.resume(tmp_path, made_from, overwrite=False)
    assert ckpt.name == "step-000003" and state["step"] == 3 and (ckpt / "config.json").exists()
    with pytest.raises(ConfigError, match=r"other settings or data \(data, lr\)"):
        checkpoint.resume(tmp_path, {"lr": 2e-3, "data": "abd"}, overwrite=False)
    assert checkpoint.resume(tmp_path, {"lr": 2e-3}, overwrite=True) == (None, None)
    checkpoint.clear(tmp_path)
    assert checkpoint.latest(tmp_path) is None


def test_metric_lines_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    checkpoint.keep_lines_upto(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
