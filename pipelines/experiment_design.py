"""What the experiment is, fixed before its confirmation draws ran: the arms and their SFT settings, the
selection and confirmation draws, the gate and its margin, the recipes and the decision rule
(pipelines/experiment.py runs it)."""
from __future__ import annotations

from pathlib import Path

from pipelines.recipes import recipe_settings

MATCHED = "<lr x mean weight of pear-token>"  # resolved from each world's scored shards before its arms run
ORACLE_ONLY = "style=careful"  # the traces the target can carry out: its careful procedure (pipelines/world.py)
ARMS = {  # arm -> its SFT settings over the recipe's (None: no SFT)
    "no-sft": None,
    "uniform": {"weighting": "uniform"},
    "oracle": {"weighting": "uniform", "only": ORACLE_ONLY},
    "lr-control": {"weighting": "uniform", "lr": MATCHED},
    "pear-token": {"weighting": "pear"},  # the weights stored by the scorer (token, the reported defaults)
    "pear-token-clip0.5": {"weighting": "pear", "variant": "token", "delta_clip": "-0.5,0.3"},
    "pear-token-clip1.0": {"weighting": "pear", "variant": "token", "delta_clip": "-1.0,0.3"},
    "pear-sequence": {"weighting": "pear", "variant": "sequence"},
    "pear-block": {"weighting": "pear", "variant": "block"},
    "pear-live": {"weighting": "pear-live"},
}
GATE_ARMS = ("no-sft", "uniform", "oracle")
REFERENCES = GATE_ARMS  # the arms every run has
DEFAULT_ARMS = ("no-sft", "uniform", "oracle", "pear-token", "lr-control", "pear-token-clip0.5", "pear-token-clip1.0",
                "pear-sequence")
PRIMARY = "pear-token"  # the arm the decision rule is about (the paper's B = 1)
PEAR_ARMS = ("if-gate-holds", "always")  # when the arms other than the gate arms run
GATE_MARGIN = 0.10
SFT_MATTERS_MARGIN = 0.10  # no-sft minus uniform: reported, no longer deciding
# Draws looked at while a world's settings were chosen (results/world-selection.md) and the fresh draws
# that confirm, fixed before any of them ran. Another setting tried for the gate would turn its
# draws into selection draws too.
SELECTION_DRAWS = {"sft-matters": (0, 1, 2)}
CONFIRMATION_DRAWS = {"sft-matters": (3, 4, 5, 6, 7, 8, 9, 10)}
CURVE_STEPS = "10,25,50"  # RL steps with a snapshot to evaluate, besides 0 and the last
# RL: 100 steps. Uniform gained 0.016 between steps 100 and 150 in the earlier report (0.315 -> 0.331)
# while every arm had made most of its gain by step 100: the time goes to more draws instead.
RL_STEPS = "100"
# The one recipe: the experiment's settings per stage, laid over the embedded recipes of `make sft`,
# `make rl`, `make eval` (their YAML files, pipelines/recipes.py `with_recipe`): one CPU thread per
# stage (two chains share the 2 cores); then what --smoke changes.
RECIPE = {
    "sft": {},
    "rl": {"steps": RL_STEPS, "save_every": 50, "threads": 1, "snapshot_steps": CURVE_STEPS},
    "eval": {"k": "1,2,4,8,16"},
    "curve_eval": {"n": 8, "k": "1"},  # at the snapshots, over the eval's: pass@1 only, half the samples
}
SMOKE = {
    "sft": {"max_steps": 4},
    "rl": {"steps": 3, "prompts_per_step": 4, "samples_per_prompt": 4, "save_every": 0, "threads": 1,
           "snapshot_steps": "2"},
    "eval": {"num_prompts": 24, "n": 16, "k": "1,16", "bootstrap": 200},
    "curve_eval": {"n": 8, "k": "1"},
}
DECISION = f"""\
Written before any confirmation draw ran (pipelines/experiment_design.py DECISION), and applied as written:

1. Draws. The world's selection draws (sft-matters: {", ".join(map(str, SELECTION_DRAWS["sft-matters"]))})
   were looked at while its settings were chosen; they count in no comparison below. The
   confirmation draws (sft-matters: {", ".join(map(str, CONFIRMATION_DRAWS["sft-matters"]))}) are fresh builds,
   listed in the code before any of them ran. Every interval is a 95% t-interval on the per-draw
   paired means, n - 1 degrees of freedom; the minimum detectable difference is
   (t(0.975, n - 1) + z(0.8)) standard errors.
2. The gate, before any PEAR arm runs: can weighting the SFT data change where RL ends here? The
   oracle (uniform SFT on only the corpus traces the target can carry out, {ORACLE_ONLY}) minus
   uniform SFT, held-out pass@1 after the last RL step, must be at least +{GATE_MARGIN:.2f} with the
   interval above 0. If it fails, no PEAR arm runs and the report says so and stops: that is the
   result. No-SFT minus uniform is reported as a reference and decides nothing.
3. The primary comparison: held-out pass@1 after the last RL step, {PRIMARY} minus uniform, paired by
   draw, seed and prompt. PEAR helps if the interval lies above 0, hurts if below 0, and neither
   otherwise (the minimum detectable difference then says how large an effect could have gone
   unseen). Beside it, the share of the oracle's gain that PEAR recovers, (pear - uniform) /
   (oracle - uniform), with Fieller's interval on n - 1 degrees of freedom.
4. Secondary, reported whatever they say and not deciding: PEAR token with the lower delta clip at
   -0.5 and -1.0, PEAR sequence, the learning-rate control (is a difference from PEAR's per-token
   shape or from its smaller average step?), the area under the pass@1 curve over RL steps and
   pass@16 after RL. No correction for the number of secondary comparisons: read them as such."""


def setting(recipe: dict, part: str, name: str) -> str:
    """The value of setting `name` (a field: `lr`, `k`) that the stage of `part` of `recipe` (sft, rl,
    eval, or curve_eval over eval) gets: the experiment's, else the embedded recipe's (a list joined by
    commas)."""
    stage = "eval" if part == "curve_eval" else part
    value = {**recipe_settings(stage), **recipe[stage], **recipe[part]}[name]
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def curve_steps(recipe: dict) -> list[int]:
    """The RL steps evaluated: 0 (the SFT model), each snapshot, the last."""
    snaps = [int(x) for x in setting(recipe, "rl", "snapshot_steps").split(",") if x.strip()]
    return sorted({0, *snaps, int(setting(recipe, "rl", "steps"))})


def eval_dir(run: Path, step: int, last: int) -> Path:
    """The evaluation folder of one arm and seed at one RL step."""
    return run / ("eval-sft" if step == 0 else "eval-rl" if step == last else f"eval-step{step:06d}")


def sft_settings(arm: str, recipe: dict, matched_weight: float) -> dict:
    """The experiment's SFT settings, then the arm's own (which win); the control's lr is the recipe's
    times the weight."""
    lr = float(setting(recipe, "sft", "lr")) * matched_weight
    return {**recipe["sft"], **{k: f"{lr:.6g}" if v == MATCHED else v for k, v in ARMS[arm].items()}}
