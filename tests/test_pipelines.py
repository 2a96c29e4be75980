"""Routing in pipelines/: which models get the embedded recipes."""
import json
from pathlib import Path

from common.config import configure, parse_given
from pipelines import rl as prl
from scorer.job import ScoreConfig
from scorer.weights import WeightParams
from train.rl import RLConfig


def test_from_world_follows_the_provenance_chain(tmp_path, monkeypatch):
    world = tmp_path / "world"
    (world / "target").mkdir(parents=True)
    monkeypatch.setattr(prl, "WORLD", world)
    sft, rl, other, a, b = (tmp_path / x for x in ("elsewhere/sft", "rl", "other", "a", "b"))
    for folder in (sft, rl, other, a, b):
        folder.mkdir(parents=True)
    (sft / "train_summary.json").write_text(json.dumps({"model": str(world / "target")}))
    (rl / "rl_summary.json").write_text(json.dumps({"model": str(sft)}))
    (other / "train_summary.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B"}))
    (a / "rl_summary.json").write_text(json.dumps({"model": str(b)}))  # a loop ends, undecided = no
    (b / "rl_summary.json").write_text(json.dumps({"model": str(a)}))
    assert prl.from_world(str(world / "target"))
    assert prl.from_world(str(sft)) and prl.from_world(str(rl))  # wherever the folder is
    assert not prl.from_world(str(other)) and not prl.from_world(str(a))
    assert not prl.from_world(str(tmp_path / "missing"))


def test_settings_given_are_named_in_both_spellings_and_from_a_recipe_file(tmp_path):
    from common.config import parse_given
    from train.rl import RLConfig

    assert parse_given(RLConfig, ["--lr", "1e-3"])[1] == parse_given(RLConfig, ["--lr=1e-3"])[1] == {"lr"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prompt_set:\n  tasks: [countdown]\nsteps: 3\n")
    assert parse_given(RLConfig, ["--config", str(recipe), "--seed", "1"])[1] == {"config", "tasks", "steps", "seed"}


def no_world(monkeypatch, *modules):
    """Make building the embedded world an error in these modules: a user's run must not need it."""
    def build(*a, **k):
        raise AssertionError("the embedded world was built")
    for m in modules:
        monkeypatch.setattr(m, "build", build)


def test_score_with_data_needs_a_target_and_never_touches_the_world(tmp_path, monkeypatch, capsys):
    from pipelines import score, world

    no_world(monkeypatch, world)  # pipelines.score imports the world's builder only when it builds
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    assert score.main(["--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "TARGET= (--target) is required with DATA=" in capsys.readouterr().err
    # a corpus without behavior logprobs and no behavior model: exit 2 before any model is loaded
    assert score.main(["--data", str(data), "--target", "org/never-loaded", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "BEHAVIOR=" in err and "behavior_logprobs column" in err and not (tmp_path / "o").exists()
    # no DATA: the embedded defaults fill in what is not given
    cfg = score.embedded_defaults(score.ScoreConfig(out="x", target="t"), Path("w"))
    assert (cfg.data, cfg.target, cfg.behavior, cfg.out) == ("w/corpus.parquet", "t", "w/behavior", "x")


def test_eval_and_rl_of_a_users_model_never_touch_the_world(tmp_path, monkeypatch, capsys):
    no_world(monkeypatch, prl)
    assert prl.main(["eval", "--model", str(tmp_path / "mine"), "--out", str(tmp_path / "e")]) == 2
    assert prl.main(["rl", "--model", str(tmp_path / "mine"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count(f"'{tmp_path / 'mine'}' not found") == 2


def test_sft_on_the_default_folder_keeps_a_reweighted_variant(tmp_path, monkeypatch):
    """`make reweight VARIANT=block` then `make sft`: the default folder is checked with block weights."""
    import subprocess

    from pipelines import sft
    from scorer.shards import core_table, write_atomic

    monkeypatch.chdir(tmp_path)
    scores = tmp_path / "runs" / "score"
    scores.mkdir(parents=True)
    meta = {"schema_version": 2, "variant": "block", "gamma": 0.99, "block_size": 8, "delta_clip": [-0.1, 0.2],
            "log_weight_clip": [-5.0, 5.0], "target_model": {"path": str(sft.WORLD.resolve() / "target")}}
    write_atomic(core_table(["a"], [[1, 2, 3]], [[(1, 3)]], [[-1, -1]], [[-1, -1]], [[1, 1]]), scores / "c.parquet",
                 meta)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    sft.ensure_scores("runs/score")
    [item] = json.loads(calls[0][-1])  # the child's plan: one scoring stage, with the shards' weighting
    assert item["stage"] == "pipelines.score"
    weights = configure(ScoreConfig, item["settings"]).weights.params()
    assert weights == WeightParams(variant="block", gamma=0.99, block_size=8, delta_clip=(-0.1, 0.2),
                                   log_weight_clip=(-5.0, 5.0))
    calls.clear()
    meta["target_model"] = {"path": str(tmp_path / "my-model")}  # a user's own scores: nothing to make
    write_atomic(core_table(["a"], [[1, 2, 3]], [[(1, 3)]], [[-1, -1]], [[-1, -1]], [[1, 1]]), scores / "c.parquet",
                 meta)
    sft.ensure_scores("runs/score")
    assert not calls


def test_a_users_model_needs_its_prompts_named(tmp_path, monkeypatch, capsys):
    """The stages' default prompts are the embedded world's (1-digit chain_sum): for any other model,
    make rl and make eval stop before any work unless --prompts or --tasks names them."""
    no_world(monkeypatch, prl)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    for verb in ("rl", "eval"):
        assert prl.main([verb, "--model", str(mine), "--out", str(tmp_path / verb)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not descend from the embedded world" in err[0]
        assert "--prompts (PROMPTS=" in err[0] and "--tasks (TASKS=" in err[0]
        assert not (tmp_path / verb).exists()
    recipe = tmp_path / "recipe.yaml"
    given = lambda argv: parse_given(RLConfig, argv)[1]
    for text, named in [("lr: 1.0e-6\n", False), ("prompts: data.jsonl\n", True),
                        ("prompt_set:\n  tasks: [countdown]\n", True)]:
        recipe.write_text(text)
        assert prl.gave_prompts(given(["--config", str(recipe)])) == named
        assert prl.gave_prompts(given([f"--config={recipe}"])) == named
    assert prl.gave_prompts(given(["--tasks", "countdown"])) and prl.gave_prompts(given(["--prompts=p.jsonl"]))
    assert not prl.gave_prompts(given(["--prompts-split", "test"]))


def test_rl_help_gives_the_learning_rate_the_recipe_uses(capsys):
    """`train.rl --help` once said the embedded model takes 1e-4; its recipe uses 3e-4."""
    import re

    import pytest

    from common.config import parse
    from pipelines.recipes import recipe_settings
    from train.rl import RLConfig

    with pytest.raises(SystemExit):
        parse(RLConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.rindex("--lr LR")  # the flag's help, after the usage lines
    lr_help = text[start:text.index("--weight-decay", start)]
    assert "learning rate" in lr_help
    recipe_lr = float(recipe_settings("rl")["lr"])
    rates = {float(x) for x in re.findall(r"\d+(?:\.\d+)?e-\d+", lr_help)}
    assert rates <= {RLConfig.lr, recipe_lr}, lr_help


def test_sft_lays_the_embedded_recipe_beneath_the_flags_given(tmp_path, monkeypatch, capsys):
    """pipelines.sft parses once: one train.sft config per weighting, the embedded recipe under the
    flags given; --model or a --config of the user's leaves the recipe out."""
    from pipelines import sft
    from pipelines.recipes import recipe_settings
    from scorer.shards import core_table, write_atomic

    scores = tmp_path / "s"
    scores.mkdir()
    meta = {"schema_version": 2, "variant": "token", "target_model": {"path": str(sft.WORLD.resolve() / "target")}}
    write_atomic(core_table(["a"], [[1, 2, 3]], [[(1, 3)]], [[-1, -1]], [[-1, -1]], [[1, 1]]), scores / "c.parquet",
                 meta)
    runs = []

    def run(cfg):
        runs.append(cfg)
        return {"weighting": cfg.weighting, "out": cfg.out, "steps": 1, "final_loss": 1.0, "last_epoch_loss": 1.0,
                "heldout_nll_start": 2.0, "heldout_nll": 1.5, "mean_weight": 1.0, "mean_ess_fraction": 1.0,
                "loop_seconds": 0.1}

    monkeypatch.setattr(sft.sft, "run", run)
    recipe = recipe_settings("sft")
    assert sft.main(["--scores", str(scores), "--out", str(tmp_path / "o"), "--lr", "0.5"]) == 0
    assert [(type(c).__name__, c.weighting, c.out) for c in runs] == \
        [("SFTConfig", w, str(tmp_path / "o" / w)) for w in ("uniform", "pear")]
    assert runs[0].lr == 0.5 and runs[0].epochs == recipe["epochs"] != sft.SFTRunsConfig.epochs
    o = tmp_path / "o"
    assert capsys.readouterr().out.splitlines()[-1] == f"models in {o / 'uniform'}, {o / 'pear'}"
    own = tmp_path / "own.yaml"
    own.write_text("lr: 0.25\n")
    for flags in (["--model", "m"], ["--config", str(own)]):
        runs.clear()
        assert sft.main(["--scores", str(scores), "--out", str(tmp_path / "o"), "--weighting", "pear", *flags]) == 0
        assert len(runs) == 1 and runs[0].out == str(tmp_path / "o") and runs[0].epochs == sft.SFTRunsConfig.epochs
    assert runs[0].lr == 0.25
    runs.clear()
    assert sft.main(["--scores", str(scores), "--weighting", "pear,plain"]) == 2 and not runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weighting" in err[0] and "'pear,plain'" in err[0]
