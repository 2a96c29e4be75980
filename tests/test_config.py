"""One weighting group for every stage: flags, YAML (flat or nested) and checks."""
import pytest

from common.config import ConfigError, beneath, parse, parse_given
from scorer.config import WeightConfig
from scorer.job import ScoreConfig
from scorer.reweight import ReweightConfig
from train.eval import EvalConfig
from train.rl import RLConfig
from train.sft import SFTConfig


@pytest.mark.parametrize("cls", [ScoreConfig, ReweightConfig, SFTConfig])
def test_every_stage_takes_the_same_weight_flags(cls):
    cfg = parse(cls, ["--variant", "block", "--gamma", "0.99", "--block-size", "8", "--delta-clip=-0.1,0.2"])
    assert cfg.weights == WeightConfig("block", 0.99, 8, (-0.1, 0.2), (-10.0, 5.0))
    assert cfg.weights.params().as_dict()["delta_clip"] == [-0.1, 0.2]


def test_yaml_takes_the_group_flat_or_nested(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("variant: sequence\ngamma: 0.9\nout: x\n")
    nested.write_text("weights:\n  variant: sequence\n  gamma: 0.9\nout: x\n")
    a, b = parse(ScoreConfig, ["--config", str(flat)]), parse(ScoreConfig, ["--config", str(nested)])
    assert a == b and a.weights.variant == "sequence" and a.out == "x"
    assert parse(ScoreConfig, ["--config", str(nested), "--gamma", "0.5"]).weights.gamma == 0.5  # flags win


def test_sft_keeps_the_stored_weights_unless_a_variant_is_named():
    assert parse(SFTConfig, []).weight_params() is None
    assert parse(SFTConfig, ["--variant", "token"]).weight_params().variant == "token"


def test_bad_constants_exit_2_naming_them(capsys):
    for flags, words in [(["--gamma", "0"], "gamma must be in (0, 1]"),
                         (["--variant", "tokens"], "variant must be one of")]:
        with pytest.raises(SystemExit) as e:
            parse(ScoreConfig, flags)
        assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("cls, flag", [(ScoreConfig, "--log-weight-clip"), (ReweightConfig, "--log-weight-clip"),
                                       (SFTConfig, "--log-weight-clip"), (RLConfig, "--prompt-seed"),
                                       (EvalConfig, "--prompt-seed")])
def test_help_prints_every_flag(cls, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse(cls, ["--help"])  # a "%" in a help text once broke argparse's formatting
    assert e.value.code == 0 and flag in capsys.readouterr().out


def test_a_recipe_goes_beneath_the_fields_given():
    cfg, given = parse_given(ScoreConfig, ["--gamma", "0.5", "--out", "x"])
    cfg = beneath(cfg, {"weights": {"variant": "block", "gamma": 0.9}, "out": "y", "max_len": "100"}, given)
    assert (cfg.weights.variant, cfg.weights.gamma, cfg.out, cfg.max_len) == ("block", 0.5, "x", 100)
    with pytest.raises(ConfigError, match="unknown fields"):
        beneath(cfg, {"no_such": 1}, given)
    with pytest.raises(ConfigError, match="--max-len"):
        beneath(cfg, {"max_len": "many"}, given)
