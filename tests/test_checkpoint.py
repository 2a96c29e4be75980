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


class RunsCodeOnLoad:
    """A pickle that would run code as it loads: it touches the file it names."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path):
    import torch

    tok = tiny_tokenizer("qwen2_5")
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    made_from = {"lr": 1e-3}
    ckpt = checkpoint.save(tmp_path, 1, lm, tok, {"step": 1, "made_from": made_from}, keep=1)
    ran = tmp_path / "code-ran"
    torch.save({"step": 1, "made_from": made_from, "payload": RunsCodeOnLoad(ran)}, ckpt / checkpoint.STATE)
    with pytest.raises(ConfigError) as refused:
        checkpoint.resume(tmp_path, made_from, overwrite=False)
    assert not ran.exists()
    message = str(refused.value)
    assert "\n" not in message and str(ckpt / checkpoint.STATE) in message and "refused" in message


def test_what_the_trainers_keep_loads_as_plain_data(tmp_path):
    """The trainers' state (AdamW's state dict, torch's RNG, settings with None, bools, lists and
    tuples) goes through the weights-only loader unchanged."""
    import torch

    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    state = {"step": 7, "made_from": {"lr": 1e-3, "lora_targets": None, "fsdp": False, "tasks": ["a", "b"],
                                      "pair": (1, 2)},
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "loop_seconds": 1.5}
    torch.save(state, tmp_path / checkpoint.STATE)
    loaded = checkpoint.load_state(tmp_path / checkpoint.STATE)
    assert loaded["made_from"] == state["made_from"] and loaded["step"] == 7
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    fresh = torch.optim.AdamW(net.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
