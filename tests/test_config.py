"""One weighting group for every stage: flags, YAML (flat or nested) and checks; the flags every
entry point shares (a bare boolean switch, a flag hidden from --help, an exit code from the result)."""
import argparse
from dataclasses import dataclass

import pytest

from common.config import ConfigError, beneath, cli, field, parse, parse_given
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


@dataclass
class Switches:
    smoke: bool = field(False, "a switch")
    steps: int = field(3, "a number")
    child: str = field("", argparse.SUPPRESS)


def test_a_boolean_flag_alone_means_true(capsys):
    assert parse(Switches, []) == Switches(False, 3)
    assert parse(Switches, ["--smoke"]) == Switches(True, 3)
    assert parse(Switches, ["--smoke", "--steps", "4"]) == Switches(True, 4)
    assert parse(Switches, ["--steps", "4", "--smoke"]) == Switches(True, 4)
    assert parse(Switches, ["--smoke", "false"]).smoke is False and parse(Switches, ["--smoke=no"]).smoke is False
    with pytest.raises(SystemExit) as e:
        parse(Switches, ["--smoke", "maybe"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --smoke: expected true/false, got 'maybe'"


def test_a_suppressed_flag_works_but_is_not_shown(capsys):
    assert parse(Switches, ["--child", "{}"]).child == "{}"
    with pytest.raises(SystemExit):
        parse(Switches, ["--help"])
    shown = capsys.readouterr().out
    assert "--smoke" in shown and "--child" not in shown


def test_cli_exit_code_from_the_result():
    assert cli(Switches, ["--steps", "5"], None, lambda cfg: cfg.steps, lambda n: None) == 0
    assert cli(Switches, ["--steps", "5"], None, lambda cfg: cfg.steps, lambda n: None, status=lambda n: n) == 5


def test_entry_point_choices_are_one_line_errors(capsys):
    from bench.bench_rl_memory import MemoryBenchConfig
    from pipelines.experiment import ExperimentConfig

    for cls, flags, words in [(ExperimentConfig, ["--world", "flat"], "--world flat: not a world"),
                              (ExperimentConfig, ["--smoke", "--pear-arms", "sometimes"],
                               "--pear-arms sometimes: one of if-gate-holds, always"),
                              (ExperimentConfig, ["--worlds", "0,a"], "--worlds 0,a: comma-separated integers"),
                              (MemoryBenchConfig, ["--smoke", "--modes", "all"], "--modes some of")]:
        with pytest.raises(SystemExit) as e:
            parse(cls, flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1
    cfg = parse(ExperimentConfig, ["--smoke", "--pear-arms", "always", "--arms", "no-sft,uniform,oracle"])
    assert cfg.smoke and cfg.pear_arms == "always" and cfg.arm_list() == ["no-sft", "uniform", "oracle"]


@pytest.mark.parametrize("flags, words", [(["--epoch", "2"], "unknown flag --epoch; did you mean --epochs?"),
                                          (["--save", "1"], "unknown flag --save; did you mean --save-every?"),
                                          (["--lr=1e-4", "--warmup-ration", "0.1"],
                                           "unknown flag --warmup-ration; did you mean --warmup-ratio?"),
                                          (["--epochs", "2", "3"],
                                           "unexpected argument '3'; a flag takes one value (--name value)")])
def test_an_unknown_or_abbreviated_flag_is_one_line_naming_the_nearest(flags, words, capsys):
    # argparse took `--epoch 2` for `--epochs 2`, and met an unknown flag with its usage block
    with pytest.raises(SystemExit) as e:
        parse(SFTConfig, flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == f"error: {words}"
