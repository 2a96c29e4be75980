"""The experiment's statistics by hand, its control arm, and its reduced run: every arm goes through
SFT, RL and evaluation, and the report is complete and well-formed (check_complete runs at its end)."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=100)
def test_experiment_smoke_writes_a_complete_report(world, tmp_path):
    """Four arms: the three gate arms and the stored PEAR weights; the other arms differ only in SFT
    flags (test_lr_control_scales_the_recipe_learning_rate; pear-live in test_sft.py)."""
    arms = ["no-sft", "uniform", "oracle", "pear-token"]
    out = tmp_path / "exp"
    # through make, as a user types it (the quiet console: third-party output goes to the run's log)
    proc = subprocess.run(["make", "--no-print-directory", "experiment-smoke", f"OUT={out}", f"ARMS={','.join(arms)}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "experiment.json").read_text())
    assert list(report["arms"]) == arms and report["meta"]["arms"] == arms
    assert report["worlds"] == [0] and report["meta"]["world"] == "embedded"
    assert set(report["sft_matters"]) >= {"diff", "lo", "hi", "holds"} and set(report["gate"]) >= {"diff", "holds"}
    assert set(report["oracle"]) >= {"diff", "lo", "hi", "per_world"} and report["selection_worlds"] == []
    assert set(report["primary"]) >= {"diff", "lo", "hi", "mdd", "method", "per_world"}
    assert set(report["recovered"]) >= {"share", "lo", "hi"}
    for arm in arms:  # pass@1 before RL, at the snapshot, after the last step
        assert report["curve"][arm]["steps"] == [0, 2, 3] and len(report["curve"][arm]["pass@1"]) == 3
        assert (out / "world0" / arm / "seed0" / "eval-step000002" / "eval.json").exists()
        assert not list((out / "world0" / arm).rglob("*.safetensors"))  # models pruned once evaluated
    # the draw's record: small, and enough for the report without the run folder
    record = out / "experiment-draws" / "embedded-0.json"
    assert record.stat().st_size < 200_000
    rec = json.loads(record.read_text())
    assert set(rec["arms"]) == set(arms) and rec["built_with"]["threads"] == 2
    oracle = report["arms"]["oracle"]["weights"]
    assert oracle["mean_weight_by_style"]["careful"] == 1.0 and oracle["mean_weight_by_style"]["words"] == 0.0
    assert oracle["train_rows"] < report["arms"]["uniform"]["weights"]["train_rows"]
    assert set(report["arms"]["pear-token"]["after_rl"]) == {"pass@1", "pass@16"}
    md = (out / "experiment.md").read_text()
    for arm in arms:
        assert f"| {arm} |" in md
    assert md.index("## Decision rule") < md.index("## Result") < md.index("## What the numbers show")
    assert md.strip() in proc.stdout  # the report is what the terminal shows
    for png in ("experiment_curve.png", "experiment_reward_curves.png", "experiment_offline_vs_rl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_level_bootstrap_counts_the_seed_spread():
    from statistics import NormalDist

    from pipelines.experiment_stats import Z_POWER, estimate, two_level_bootstrap

    flat = np.full((3, 50), 0.4)
    assert np.allclose(two_level_bootstrap(flat, 100, 0), 0.4)
    # prompts agree within a seed, seeds disagree: only resampling seeds shows the spread
    split = np.array([[0.0] * 20, [1.0] * 20])
    means = two_level_bootstrap(split, 2000, 0)
    assert set(np.round(means, 6)) <= {0.0, 0.5, 1.0} and means.min() == 0.0 and means.max() == 1.0
    e = estimate([split])  # one draw: the bootstrap over its seeds and prompts, named as such
    assert e["mean"] == 0.5 and e["per_seed"] == [[0.0, 1.0]] and e["per_world"] == [0.5]
    assert e["ci95"] == [0.0, 1.0] and e["mdd"] == pytest.approx((NormalDist().inv_cdf(0.975) + Z_POWER) * e["se"])
    assert "one world draw" in e["method"]


def test_several_draws_take_a_t_interval_on_their_means():
    from pipelines.experiment_stats import estimate

    worlds = [np.zeros((2, 30)), np.ones((2, 10))]  # prompt counts differ between draws
    e = estimate(worlds)
    assert e["mean"] == 0.5 and e["per_world"] == [0.0, 1.0]  # each draw counts once, whatever its prompts
    assert e["ci95"] == pytest.approx([0.5 - 12.706205 * 0.5, 0.5 + 12.706205 * 0.5])  # t(0.975, 1) x se 0.5
    same = estimate([np.full((2, 30), 0.3), np.full((2, 10), 0.3)])
    assert same["ci95"] == pytest.approx([0.3, 0.3]) and same["se"] == pytest.approx(0.0, abs=1e-12)


def test_area_under_the_curve_by_hand():
    from pipelines.experiment_stats import area_under_curve

    steps = [0, 10, 25, 50]
    # a curve 0 -> 1 at step 10, then flat: (10 * 0.5 + 40 * 1) / 50
    assert area_under_curve(np.array([0.0, 1.0, 1.0, 1.0]), steps) == pytest.approx(45 / 50)
    per_prompt = np.array([[0.0, 1.0, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]])  # (prompts, steps)
    assert area_under_curve(per_prompt, steps) == pytest.approx([0.9, 0.2])


def test_sft_matters_rule_needs_the_margin_and_the_interval():
    from pipelines.experiment_stats import sft_matters

    e = lambda mean, lo, hi: {"mean": mean, "ci95": [lo, hi], "se": 0.01, "per_world": [mean]}  # noqa: E731
    assert sft_matters(e(-0.15, -0.2, -0.1), 0.10)["holds"]
    assert not sft_matters(e(-0.08, -0.1, -0.06), 0.10)["holds"]  # below 0, but by less than the margin
    assert not sft_matters(e(-0.15, -0.35, 0.02), 0.10)["holds"]  # large, but the interval reaches 0
    r = sft_matters(e(-0.15, -0.2, -0.1), 0.10)
    assert (r["diff"], r["lo"], r["hi"]) == (-0.15, -0.2, -0.1)


def test_lr_control_scales_the_recipe_learning_rate():
    from common.config import configure
    from pipelines.experiment import ARMS, RECIPE, sft_settings
    from pipelines.recipes import recipe_settings, with_recipe
    from train.sft import SFTConfig

    def config(arm):  # as pipelines.stages makes it: the arm's settings over the embedded recipe
        settings = sft_settings(arm, RECIPE, 0.5)
        return with_recipe(configure(SFTConfig, settings), "sft", set(settings))

    recipe, control = recipe_settings("sft"), config("lr-control")
    assert control.lr == float(f"{float(recipe['lr']) * 0.5:.6g}") and control.epochs == recipe["epochs"]
    assert control.weighting == "uniform"
    assert config("pear-block").weights.variant == "block"
    assert ARMS["no-sft"] is None and {"uniform", "pear-live", "lr-control"} <= set(ARMS)


def test_mean_stored_weight_streams_every_shard(tmp_path):
    import pyarrow as pa

    from pipelines.experiment import mean_stored_weight
    from scorer.shards import write_atomic

    for i, weights in enumerate([[[1.0, 0.5], [0.25]], [[2.0]]]):
        write_atomic(pa.table({"weights": weights}), tmp_path / f"c-{i:05d}.parquet", {"variant": "token"})
    assert mean_stored_weight(tmp_path) == pytest.approx((1.0 + 0.5 + 0.25 + 2.0) / 4)
    write_atomic(pa.table({"weights": [[1.0]]}), tmp_path / "c-00009.parquet", {"variant": "block"})
    with pytest.raises(ValueError, match="block weights"):
        mean_stored_weight(tmp_path)


def test_arms_must_include_the_references():
    from pipelines.experiment import main

    for arms in ("uniform,pear-token", "no-sft,uniform,pear-token", "no-sft,uniform,oracle,pear-magic"):
        with pytest.raises(SystemExit):
            main(["--smoke", "--arms", arms])


def test_incomplete_report_names_what_is_missing(tmp_path):
    from pipelines.experiment_report import check_complete

    (tmp_path / "experiment.json").write_text(json.dumps({"arms": {}, "recipe_steps": 3, "worlds": [0]}))
    with pytest.raises(ValueError, match="arm uniform missing") as e:
        check_complete(tmp_path, [0, 1], [0], [1])
    assert "worlds [0] instead of [0, 1]" in str(e.value) and "sft_matters incomplete" in str(e.value)


def test_stages_run_in_order_and_stop_at_the_first_failure(tmp_path, monkeypatch, capsys):
    import torch

    from pipelines.stages import main

    from pipelines.stages import stage

    (tmp_path / "fake_stage.py").write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from common.config import Stage\n"
        "@dataclass\n"
        "class Config:\n"
        "    name: str = ''\n"
        "    rc: int = 0\n"
        "def work(cfg):\n"
        "    with open(__file__ + '.calls', 'a') as f:\n"
        "        f.write(f'{cfg.name}:{torch.get_num_threads()}\\n')\n"
        "    torch.set_num_threads(1)  # as a stage with --threads 1 does\n"
        "    return cfg.rc\n"
        "STAGE = Stage(Config, work, lambda rc: None, status=lambda rc: rc)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = tmp_path / "fake_stage.py.calls"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main([json.dumps(["== first", stage("fake_stage", name="a"), "== second",
                                 stage("fake_stage", name="b")])]) == 0
    finally:
        torch.set_num_threads(threads)
    # each stage starts with the threads the process started with, as in a process of its own
    assert calls.read_text().split() == ["a:2", "b:2"]
    assert capsys.readouterr().out.splitlines() == ["== first", "== second"]
    calls.unlink()
    plan = [stage("fake_stage", name="a"), stage("fake_stage", name="b", rc=3), stage("fake_stage", name="c")]
    assert main([json.dumps(plan)]) == 3
    assert [c.split(":")[0] for c in calls.read_text().split()] == ["a", "b"]
    assert main([json.dumps([stage("fake_stage", nmae="a")])]) == 2  # a setting it does not have: refused
    assert "unknown fields ['nmae']" in capsys.readouterr().err
    assert main([json.dumps([stage("fake_stage", "rl", name="a")])]) == 2  # the RL recipe goes beneath: its fields
    assert "unknown fields ['lr', " in capsys.readouterr().err


def fake_record(draw: int, arms: list[str], shift: dict[str, float], prompts: int = 40) -> dict:
    """A draw's record as Draw.run_arm writes it, with pass rates set per arm (SMOKE's steps 0, 2, 3)."""
    rng = np.random.default_rng(draw)
    chain = lambda p: {  # noqa: E731
        "steps": {str(t): {"n": n, "passed": [int(c) for c in rng.binomial(n, np.clip(p + t / 30, 0, 1), prompts)]}
                  for t, n in ((0, 16), (2, 8), (3, 16))},
        "reward_curve": [0.1, 0.2, 0.3],
        "sft": {"heldout_nll": 1.0, "heldout_nll_start": 2.0, "mean_weight": 0.8, "mean_ess_fraction": 0.9,
                "train_rows": 100, "steps": 10}}
    styles = {"careful": 1.0, "words": 0.5, "other": 0.2}
    return {"world": "embedded", "draw": draw, "prompts": [[f"q{i}", 0] for i in range(prompts)],
            "built_with": {"kernel": "AVX2", "threads": 2, "torch": "2.13.0"},
            "world_build": {"corpus_rows": 700, "behavior_accuracy": 0.9}, "lr_control_factor": 0.7,
            "weights_by_style": {"tokens": {"careful": 10, "words": 20, "other": 1},
                                 "arms": {a: {"mean_weight": styles, "share_log_weight_at_lo": 0.0,
                                              "share_log_weight_at_hi": 0.0, "share_delta_at_lo": 0.5,
                                              "share_delta_at_hi": 0.0} for a in arms if a != "no-sft"}},
            "arms": {a: {"seed0": chain(0.2 + shift.get(a, 0.0))} for a in arms}}


def test_the_report_comes_from_the_records_alone(tmp_path):
    """Three draws' records -> experiment.json's keys, the gate, the primary and the Fieller share, the
    markdown and the plots, checked complete; no run folder needed."""
    from pipelines.experiment import SMOKE, write_report

    arms = ["no-sft", "uniform", "oracle", "pear-token"]
    shift = {"no-sft": -0.1, "oracle": 0.3, "pear-token": 0.15}
    records = {w: fake_record(w, arms, shift) for w in (3, 4, 5)}
    rep = write_report(records, "embedded", [0], arms, SMOKE, tmp_path, {"command": "test", "minutes": 0.0})
    assert rep["worlds"] == [3, 4, 5] and rep["selection_worlds"] == []
    assert rep["gate"]["holds"] and rep["oracle"]["diff"] == pytest.approx(0.3, abs=0.08)
    assert rep["primary"]["method"] == "t-interval over 3 world draws (2 df)" and len(rep["primary"]["per_world"]) == 3
    assert rep["recovered"]["share"] == pytest.approx(rep["primary"]["diff"] / rep["oracle"]["diff"])
    assert rep["curve"]["pear-token"]["steps"] == [0, 2, 3] and len(rep["curve"]["pear-token"]["diff"]) == 3
    md = (tmp_path / "experiment.md").read_text()
    assert md.index("## Decision rule") < md.index("## The gate") < md.index("## Result")
    assert "t-interval over 3 world draws (2 df)" in md and "| pear-token | " in md and "Fieller" in md
    # a gate that fails says so, and the report stops at it
    flat = {w: fake_record(w, arms[:3], {"oracle": 0.0}) for w in (3, 4, 5)}
    rep = write_report(flat, "embedded", [0], arms[:3], SMOKE, tmp_path / "flat", {"command": "test", "minutes": 0})
    assert not rep["gate"]["holds"] and rep["primary"] is None
    assert "The gate failed, so the report stops here" in (tmp_path / "flat" / "experiment.md").read_text()


def test_a_draw_built_with_another_fingerprint_is_refused(tmp_path, monkeypatch):
    import pipelines.experiment as experiment
    from pipelines.experiment import Draw, FingerprintError, write_record

    monkeypatch.chdir(tmp_path)
    d = Draw("sft-matters", 3, tmp_path / "runs", tmp_path / "records")
    write_record(d.record_path, {"built_with": {"kernel": "AVX512", "threads": 2, "torch": "2.13.0+cpu"}})
    monkeypatch.setattr(experiment, "built_with", lambda: {"kernel": "AVX2", "threads": 2, "torch": "2.13.0+cpu"})
    with pytest.raises(FingerprintError, match="AVX512"):
        d.prepare(["uniform"], [0])  # before building anything
    assert not d.world.exists()
    d.world.mkdir(parents=True)  # a world copied from the machine that made the draw is accepted
    (d.world / "world.json").write_text(json.dumps({"built_with": {"kernel": "AVX512", "threads": 2,
                                                                   "torch": "2.13.0+cpu"}}))
    assert d.check_fingerprint()["kernel"] == "AVX512"


def test_selection_draws_cannot_confirm():
    from pipelines.experiment import CONFIRMATION_DRAWS, SELECTION_DRAWS, main

    assert not set(SELECTION_DRAWS["sft-matters"]) & set(CONFIRMATION_DRAWS["sft-matters"])
    assert len(CONFIRMATION_DRAWS["sft-matters"]) >= 8
    with pytest.raises(SystemExit):
        main(["--world", "sft-matters", "--worlds", "2,3"])


def test_each_arm_trains_with_the_weighting_its_flags_name(tmp_path):
    from pipelines.experiment_records import arm_weight_params, prune
    from scorer.weights import WeightParams

    stored = WeightParams("token").as_dict()  # what the scorer stored
    assert arm_weight_params("pear-token", stored) == WeightParams("token")
    assert arm_weight_params("pear-token-clip0.5", stored) == WeightParams("token", delta_clip=(-0.5, 0.3))
    assert arm_weight_params("pear-token-clip1.0", stored) == WeightParams("token", delta_clip=(-1.0, 0.3))
    assert arm_weight_params("pear-sequence", stored) == WeightParams("sequence")
    assert arm_weight_params("uniform", stored) is None and arm_weight_params("oracle", stored) is None
    # a recorded chain keeps its JSON files and loses its models
    for f in ("sft/model.safetensors", "sft/train_summary.json", "rl/snapshots/step-000010/model.safetensors",
              "rl/checkpoints/step-50/x", "rl/model.safetensors", "eval-rl/eval.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    prune(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "eval-rl/eval.json", "sft/train_summary.json"]
