"""The experiment's report: experiment.md (decision rule first, then the numbers, whatever they
say), three plots, and a check that experiment.json holds every arm, draw, seed and number."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.experiment_stats import excludes_zero, verdict

PAPER = ("Zhang et al. (2026) report that PEAR-weighted SFT, then RL, beats plain SFT, then RL: pass@8 gains of "
         "up to 14.6% on AIME-2025 and about +40 points on logic games, over 6 models.")


def interval(x: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x['mean'])} [{f.format(x['ci95'][0])}, {f.format(x['ci95'][1])}]"


def statement(rep: dict, ks: list[int]) -> list[str]:
    """What the numbers show, in plain words, whichever way they go."""
    arms, top, check = rep["arms"], f"pass@{max(ks)}", rep["sft_matters"]
    lines = [f"- SFT matters after RL here: {'yes' if check['holds'] else 'no'}. no-sft minus uniform, post-RL "
             f"pass@1: {check['diff']:+.3f} [{check['lo']:+.3f}, {check['hi']:+.3f}] (rule: {check['rule']})."]
    if not check["holds"] and set(arms) <= {"no-sft", "uniform"}:
        lines.append("- No PEAR arm was run: in a world where the SFT start does not decide where RL ends, no SFT "
                     "weighting can be told apart after RL.")
    for arm, r in arms.items():
        g = r["rl_gain"]["pass@1"]
        lines.append(f"- RL from {arm}: pass@1 {r['after_sft']['pass@1']['mean']:.3f} -> "
                     f"{r['after_rl']['pass@1']['mean']:.3f} ({interval(g, True)}"
                     f"{'' if excludes_zero(g) else ', not distinguishable from 0'}).")
    for arm in [a for a in arms if a != "uniform"]:
        r = arms[arm]
        for name, e in (("pass@1 after RL", r["vs_uniform_after_rl"]["pass@1"]),
                        (f"{top} after RL", r["vs_uniform_after_rl"][top]),
                        ("area under the pass@1 curve", r["auc_pass@1_vs_uniform"])):
            lines.append(f"- {arm}, {name}: {interval(e, True)} vs uniform, {verdict(e)} "
                         f"(detectable: {e['mdd']:.3f}).")
    return lines


def per_draw(e: dict) -> str:
    """The per-draw values behind an interval, in the order of the draws."""
    return ", ".join(f"{v:+.3f}" for v in e["per_world"])


def method(rep: dict) -> str:
    """How the report's intervals were made (the same for every interval of one report)."""
    e = next(iter(rep["arms"].values()))["after_rl"]["pass@1"]
    n = e.get("n", len(e["per_world"]))
    if n >= 2:
        return (f"{e['method']}: a t-interval on the per-draw means, each draw one unit, its prompts' and seeds' "
                f"noise inside its mean; minimum detectable difference (t(0.975, {n - 1}) + z(0.8)) x SE")
    return e["method"]


def decision(rep: dict) -> str:
    """The primary comparison, read by the rule written before the run."""
    from pipelines.experiment import PRIMARY

    if not rep["sft_matters"]["holds"]:
        return "The rule's first step failed: this world cannot speak to PEAR (no decision)."
    r = rep["arms"].get(PRIMARY)
    if r is None:
        return f"{PRIMARY} was not among the arms run (no decision)."
    e = r["vs_uniform_after_rl"]["pass@1"]
    outcome = verdict(e, "PEAR helped", "PEAR hurt", "neither: PEAR and uniform SFT are not distinguishable")
    return (f"{PRIMARY} minus uniform, held-out pass@1 after the last RL step: {interval(e, True)} "
            f"({e.get('method', '')}; per draw {per_draw(e)}). By the rule: **{outcome}** (minimum detectable "
            f"difference {e['mdd']:.3f}).")


SELECTION = Path(__file__).resolve().parents[1] / "results" / "world-selection.md"


def chosen(world: str) -> list[str]:
    """How the world was chosen (the settings tried, in order, and what the rule said of each),
    from results/world-selection.md, for the world it is about."""
    if world != "sft-matters" or not SELECTION.exists():
        return []
    text = SELECTION.read_text().split("\n", 1)[1].strip()  # without its title
    return ["## How this world was chosen", "", text, ""]


def markdown(rep: dict, ks: list[int]) -> str:
    meta, arms, top = rep["meta"], rep["arms"], f"pass@{max(ks)}"
    steps = next(iter(arms.values()))["curve"]["steps"]
    builds = ", ".join(f"draw {w}: {b['corpus_rows']} corpus rows, behavior accuracy {b['behavior_accuracy']:.2f}"
                       for w, b in meta["world_builds"].items())
    lines = [
        f"# PEAR experiment, world `{meta['world']}`", "",
        f"Made by `{meta['command']}` on {meta['machine']}, {meta['date']}, in {meta['minutes']:.0f} minutes from "
        f"the first scored corpus to the last evaluation (commit {meta['commit']}). World draws (seeds) "
        f"{', '.join(map(str, rep['worlds']))} ({builds}); world settings {meta['world_settings'] or 'the defaults'} "
        f"(pipelines/world.py); {meta['seeds']} SFT/RL seed{'s' if meta['seeds'] > 1 else ''} per draw; held-out "
        f"prompts per draw {', '.join(map(str, rep['prompts'].values()))}, {meta['samples_per_prompt']} samples "
        "each, the same prompts for every arm, seed and RL step of a draw. Recipe in experiment.json.", "",
        "## Decision rule", "", rep["decision_rule"], "",
        *chosen(meta["world"]),
        "## Result", "", decision(rep), "",
        f"The paper's claim, beside it: {PAPER}", "",
        f"Numbers: mean over world draws (each the mean over its seeds and prompts); brackets: 95% interval, "
        f"{method(rep)}.", "",
        f"| arm | held-out NLL after SFT | pass@1 after SFT | pass@1 after RL | RL gain, pass@1 | {top} after RL | "
        f"pass@1 after RL vs uniform | {top} after RL vs uniform | pass@1 area vs uniform |",
        "|---|---|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        vs = r.get("vs_uniform_after_rl")
        auc = r.get("auc_pass@1_vs_uniform")
        lines.append(f"| {arm} | {r['heldout_nll']:.3f} | {interval(r['after_sft']['pass@1'])} | "
                     f"{interval(r['after_rl']['pass@1'])} | {interval(r['rl_gain']['pass@1'], True)} | "
                     f"{interval(r['after_rl'][top])} | {interval(vs['pass@1'], True) if vs else '-'} | "
                     f"{interval(vs[top], True) if vs else '-'} | {interval(auc, True) if auc else '-'} |")
    lines += ["", f"Held-out pass@1 over RL steps (mean; {meta['samples_per_prompt']} samples per prompt at the first "
              f"and last step, {meta['curve_samples_per_prompt']} between; the area is the mean height of this "
              "curve):", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps) + " | area |",
              "|---|" + "---|" * (len(steps) + 1)]
    for arm, r in arms.items():
        lines.append(f"| {arm} | " + " | ".join(f"{e['mean']:.3f}" for e in r["curve"]["pass@1"])
                     + f" | {r['auc_pass@1']['mean']:.3f} |")
    lines += ["", "Paired difference from uniform at each step (95% interval):", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for arm, r in arms.items():
        if "vs_uniform" in r["curve"]:
            lines.append(f"| {arm} | " + " | ".join(interval(e, True) for e in r["curve"]["vs_uniform"]) + " |")
    lines += ["", "Post-RL pass@k (95% interval):", "", "| arm | " + " | ".join(f"pass@{k}" for k in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for arm, r in arms.items():
        lines.append(f"| {arm} | " + " | ".join(interval(r["after_rl"][f"pass@{k}"]) for k in ks) + " |")
    lines += ["", "Weights each arm trained with (corpus-wide shares from the scoring summaries, mean over draws; "
              "mean weight and batch ESS as trained):", "",
              "| arm | mean weight | delta at lo clip | delta at hi clip | log G at lo clip | ESS tokens | "
              "ESS sequences |", "|---|---|---|---|---|---|---|"]
    p = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for arm, r in arms.items():
        w = r["weights"]
        if w is not None:
            lines.append(f"| {arm} | {w['mean_weight_trained']:.3f} | {p(w.get('share_delta_at_lo'))} | "
                         f"{p(w.get('share_delta_at_hi'))} | {p(w.get('share_log_weight_at_lo'))} | "
                         f"{p(w.get('ess_tokens_fraction', w['batch_ess_fraction_trained']))} | "
                         f"{p(w.get('ess_sequences_fraction'))} |")
    lines += ["", "## What the numbers show", "", *statement(rep, ks), "",
              "![pass@1 over RL steps](experiment_curve.png)", "",
              "![reward curves](experiment_reward_curves.png)", "",
              "![offline metric vs post-RL pass@k](experiment_offline_vs_rl.png)", ""]
    return "\n".join(lines)


def plots(rep: dict, ks: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, xlabel: str, ylabel: str, title: str, draw, width: float = 8) -> None:
        fig, ax = plt.subplots(figsize=(width, 4.5))
        draw(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    def curve(ax) -> None:
        for arm, c in rep["curve"].items():
            ax.plot(c["steps"], c["pass@1"], marker="o", label=arm)
            ax.fill_between(c["steps"], c["lo"], c["hi"], alpha=0.12)

    def rewards(ax) -> None:
        for arm, r in rep["arms"].items():
            curves = np.array([v["reward_curve"] for v in r["runs"].values()])  # (runs, steps)
            x = np.arange(1, curves.shape[1] + 1)
            w = max(1, curves.shape[1] // 15)  # moving average over w steps, for a readable line
            smooth = np.array([np.convolve(c, np.ones(w) / w, mode="valid") for c in curves])
            ax.plot(x[w - 1:], smooth.mean(0), label=arm)

    top = f"pass@{max(ks)}"

    def offline(ax) -> None:
        for arm, r in rep["arms"].items():
            xs = [v["heldout_nll"] for v in r["runs"].values()]
            ys = [y for world in r["after_rl"][top]["per_seed"] for y in world]  # the same order: draws, then seeds
            ax.scatter(xs, ys, label=arm)

    figure("experiment_curve.png", "RL step", "held-out pass@1",
           "Held-out pass@1 over RL (mean over world draws; band: 95% interval)", curve)
    figure("experiment_reward_curves.png", "RL step", "mean reward of the step's rollouts",
           "RL reward per arm (mean over draws and seeds, moving average)", rewards)
    figure("experiment_offline_vs_rl.png", "held-out NLL on behavior traces after SFT (lower: better SFT)",
           f"{top} after RL", "Offline SFT metric vs post-RL result (one point per draw and seed)", offline, 6.5)


PNGS = ("experiment_curve.png", "experiment_reward_curves.png", "experiment_offline_vs_rl.png")


def check_complete(results: Path, worlds: list[int], seeds: list[int], ks: list[int]) -> None:
    """The outputs exist and hold every arm, draw, seed and number; raises ValueError naming what is missing."""
    import json

    data = json.loads((results / "experiment.json").read_text())
    problems = []
    if data.get("worlds") != worlds:
        problems.append(f"worlds {data.get('worlds')} instead of {worlds}")
    sm = data.get("sft_matters") or {}
    if not all(np.isfinite(sm.get(x, np.nan)) for x in ("diff", "lo", "hi")):
        problems.append(f"sft_matters incomplete: {sm}")
    runs = {f"world{w}/seed{s}" for w in worlds for s in seeds}
    for arm in data.get("meta", {}).get("arms", ["no-sft", "uniform"]):  # the arms the run reported
        r = data.get("arms", {}).get(arm)
        if r is None:
            problems.append(f"arm {arm} missing")
            continue
        if set(r["runs"]) != runs:
            problems.append(f"{arm}: runs {sorted(r['runs'])} instead of {sorted(runs)}")
        for phase in ("after_sft", "after_rl", "rl_gain"):
            for k in ks:
                v = r[phase][f"pass@{k}"]
                if not (np.isfinite(v["mean"]) and v["ci95"][0] <= v["mean"] + 1e-12 and
                        v["mean"] <= v["ci95"][1] + 1e-12):
                    problems.append(f"{arm} {phase} pass@{k}: {v}")
        curve = data.get("curve", {}).get(arm, {})
        if len(curve.get("pass@1", [])) != len(curve.get("steps", [None])) or not curve.get("steps"):
            problems.append(f"{arm}: curve {curve}")
        for name, v in r["runs"].items():
            if len(v["reward_curve"]) != data["recipe_steps"]:
                problems.append(f"{arm} {name}: reward curve of {len(v['reward_curve'])} steps")
            if not np.isfinite(v["heldout_nll"]):
                problems.append(f"{arm} {name}: held-out NLL {v['heldout_nll']}")
    for name in ("experiment.md", *PNGS):
        if not (results / name).exists() or (results / name).stat().st_size == 0:
            problems.append(f"{name} missing or empty")
    if problems:
        raise ValueError("incomplete experiment report: " + "; ".join(problems))
