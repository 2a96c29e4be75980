"""train.sft --lora-rank: adapters through peft, a merged HF folder that transformers and vLLM load, resume."""
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from scorer.config import WeightConfig
from train import sft
from train.sft import SFTConfig, train


def lora_cfg(scores, out, **kw) -> SFTConfig:
    base = dict(scores=str(scores), out=str(out), lr=5e-3, token_budget=512, heldout_fraction=0.1, progress=False,
                threads=1, save_every=0, lora_rank=8, epochs=2)
    return SFTConfig(**{**base, **kw}, weights=WeightConfig(variant=""))


def params_of(folder) -> dict:
    return dict(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).named_parameters())


@pytest.fixture(scope="module")
def lora_run(twin_scores, tmp_path_factory):
    """LoRA on rows whose held-out ones are twins of trained ones (conftest's twin_scores), so that
    held-out NLL falls in any draw of the world."""
    out = tmp_path_factory.mktemp("lora") / "out"
    return out, train(lora_cfg(twin_scores, out))


@pytest.mark.world_draw
def test_lora_learns_and_writes_a_merged_folder(world, lora_run):
    out, s = lora_run
    assert s["heldout_nll"] < 0.9 * s["heldout_nll_start"]
    start, merged = params_of(world / "target"), params_of(out)
    assert start.keys() == merged.keys()  # a plain model folder, no adapter names
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    linear = {k for k in start if k.endswith("proj.weight")}
    assert changed == linear  # all-linear: every projection, and nothing else (embeddings, norms)
    # the merged weights are the base plus the adapter: the same logprobs as the adapter on the base
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "target"), out / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 200, (2, 24))
    with torch.no_grad():
        assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_vllm_loads_the_merged_folder(lora_run):
    from scorer.engines import TorchScorer, VllmScorer

    out, _ = lora_run
    ids = [[2, 17, 40, 33, 9, 120, 41, 7, 88, 1], [2, 5, 19, 77, 31, 64, 12, 1]]
    ours = TorchScorer(str(out), token_budget=256).score(ids, [3, 3])
    engine = VllmScorer(str(out), max_model_len=64)
    try:
        theirs = engine.score(ids, [3, 3])
    finally:
        engine.close()
    assert max(np.abs(a - b).max() for a, b in zip(ours, theirs)) < 1e-3


@pytest.mark.world_draw
@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_same_model(twin_scores, lora_run, tmp_path, train_killed_after):
    whole_out, whole = lora_run
    cut = lora_cfg(twin_scores, tmp_path / "cut", save_every=2)
    train_killed_after(lambda: train(cut), 4)
    assert (tmp_path / "cut" / "checkpoints" / "step-000004" / "adapter_model.safetensors").exists()
    resumed = train(cut)
    assert resumed["resumed_from_step"] == 4
    assert resumed["heldout_nll"] == pytest.approx(whole["heldout_nll"], rel=1e-5)
    a, b = params_of(whole_out), params_of(tmp_path / "cut")
    for k in a:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_lora_settings_are_checked_before_any_work(scores, tmp_path, capsys):
    base = ["--scores", str(scores), "--progress", "false"]
    assert sft.main(base + ["--out", str(tmp_path / "a"), "--lora-rank", "-1"]) == 2
    assert sft.main(base + ["--out", str(tmp_path / "b"), "--lora-rank", "4", "--lora-targets", "nothing_here"]) == 2
    assert "--lora-targets nothing_here" in capsys.readouterr().err
    assert sft.main(base + ["--out", str(tmp_path / "c"), "--lora-rank", "4", "--fsdp", "true"]) == 2
    assert not any((tmp_path / d).exists() for d in "abc")
