"""The experiment's report: experiment.md (decision rule first, then the gate, then the numbers,
whatever they say), three plots, and a check that experiment.json holds every arm, draw, seed and
number."""
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
    arms, top, gate, check = rep["arms"], f"pass@{max(ks)}", rep["gate"], rep["sft_matters"]
    lines = [f"- The gate (weighting the SFT data can change where RL ends): {'holds' if gate['holds'] else 'fails'}. "
             f"oracle minus uniform, post-RL pass@1: {gate['diff']:+.3f} [{gate['lo']:+.3f}, {gate['hi']:+.3f}] "
             f"(rule: {gate['rule']}).",
             f"- Reference, not deciding: no-sft minus uniform, post-RL pass@1: {check['diff']:+.3f} "
             f"[{check['lo']:+.3f}, {check['hi']:+.3f}]."]
    if not gate["holds"] and set(arms) <= {"no-sft", "uniform", "oracle"}:
        lines.append("- No PEAR arm was run: where even SFT on only the traces the target can carry out does not "
                     "change where RL ends, no SFT weighting can be told apart after RL.")
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


def gate_lines(rep: dict) -> list[str]:
    """The gate, as the rule reads it, with its per-draw values."""
    g = rep["gate"]
    lines = [f"oracle minus uniform, held-out pass@1 after the last RL step: {g['diff']:+.3f} [{g['lo']:+.3f}, "
             f"{g['hi']:+.3f}] ({g.get('method')}; per draw {', '.join(f'{v:+.3f}' for v in g['per_world'])}). "
             f"Rule: {g['rule']}. **The gate {'holds' if g['holds'] else 'fails'}.**"]
    if not g["holds"]:
        lines += ["", "The gate failed, so the report stops here: in this world, on these draws, SFT on only the "
                  "traces the target can carry out does not end RL measurably higher than uniform SFT, and no "
                  "weighting of the same data could be told apart from uniform after RL. That is the result."]
    r = rep["sft_matters"]
    lines += ["", f"Reference, deciding nothing: no-sft minus uniform, post-RL pass@1 {r['diff']:+.3f} "
              f"[{r['lo']:+.3f}, {r['hi']:+.3f}] (per draw {', '.join(f'{v:+.3f}' for v in r['per_world'])})."]
    return lines


def recovered(rep: dict) -> str:
    """The share of the oracle's gain that PEAR recovers, with Fieller's interval."""
    r = rep.get("recovered")
    if not r or r["share"] is None:
        return ""
    ci = f"[{r['lo']:+.2f}, {r['hi']:+.2f}]" if r["bounded"] else \
        "(no bounded interval: the oracle's gain is not distinguishable from 0 at this many draws)"
    return (f"Share of the oracle's gain that PEAR recovers, (pear-token - uniform) / (oracle - uniform): "
            f"{r['share']:+.2f} {ci} ({r['method']}).")


def decision(rep: dict) -> str:
    """The primary comparison, read by the rule written before the run."""
    from pipelines.experiment_design import PRIMARY

    if not rep["gate"]["holds"] and PRIMARY not in rep["arms"]:
        return "The gate failed: this world cannot speak to PEAR (no decision)."
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
    builds = ", ".join(f"draw {w}: {b['corpus_rows']} corpus rows, behavior accuracy {b['behavior_accuracy']:.2f}, "
                       f"built with {b['built_with'].get('kernel')}/{b['built_with'].get('threads')} threads"
                       for w, b in meta["world_builds"].items())
    selection = rep.get("selection_worlds") or []
    lines = [
        f"# PEAR experiment, world `{meta['world']}`", "",
        f"Made by `{meta['command']}` on {meta['machine']}, {meta['date']}, in {meta['minutes']:.0f} minutes from "
        f"the start of the run that finished it to its end (commit {meta['commit']}; earlier chains resumed from "
        f"their records). Confirmation draws (seeds) {', '.join(map(str, rep['worlds']))} ({builds})"
        + (f"; selection draws {', '.join(map(str, selection))}, which chose the world, count nowhere here"
           if selection else "")
        + f"; world settings {meta['world_settings'] or 'the defaults'} "
        f"(pipelines/world.py); {meta['seeds']} SFT/RL seed{'s' if meta['seeds'] > 1 else ''} per draw; held-out "
        f"prompts per draw {', '.join(map(str, rep['prompts'].values()))}, {meta['samples_per_prompt']} samples "
        "each, the same prompts for every arm, seed and RL step of a draw. Recipe in experiment.json.", "",
        "## Decision rule", "", rep["decision_rule"], "",
        *chosen(meta["world"]),
        "## The gate", "", *gate_lines(rep), "",
        "## Result", "", decision(rep), "", *([recovered(rep), ""] if recovered(rep) else []),
        f"The paper's claim, beside it: {PAPER}", "",
        "Per draw, post-RL pass@1 minus uniform's (each draw's mean over its seeds and prompts; the intervals "
        "are over these values):", "",
        "| arm | " + " | ".join(f"draw {w}" for w in rep["worlds"]) + " | mean [95% interval] |",
        "|---|" + "---|" * (len(rep["worlds"]) + 1),
        *[f"| {arm} | " + " | ".join(f"{v:+.3f}" for v in r["vs_uniform_after_rl"]["pass@1"]["per_world"])
          + f" | {interval(r['vs_uniform_after_rl']['pass@1'], True)} |"
          for arm, r in arms.items() if "vs_uniform_after_rl" in r], "",
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
    lines += ["", "Weights each arm trained with: the mean token weight of each trace style (from the stored logprobs; "
              "uniform 1 everywhere, the oracle 1 on careful traces and 0 elsewhere), the share of tokens at the "
              "clips (corpus-wide), mean weight and batch ESS as trained; mean over draws:", "",
              "| arm | careful | words | other | delta at lo clip | log G at lo clip | log G at hi clip | "
              "mean weight trained | batch ESS | training rows |", "|---|---|---|---|---|---|---|---|---|---|"]
    p = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    f3 = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for arm, r in arms.items():
        w = r["weights"]
        if w is not None:
            by = w.get("mean_weight_by_style", {})
            lines.append(f"| {arm} | {f3(by.get('careful'))} | {f3(by.get('words'))} | {f3(by.get('other'))} | "
                         f"{p(w.get('share_delta_at_lo'))} | {p(w.get('share_log_weight_at_lo'))} | "
                         f"{p(w.get('share_log_weight_at_hi'))} | {w['mean_weight_trained']:.3f} | "
                         f"{p(w['batch_ess_fraction_trained'])} | {w['train_rows']:.0f} |")
    tokens = next((r["weights"]["style_tokens"] for r in arms.values() if r["weights"] and
                   "style_tokens" in r["weights"]), None)
    if tokens:
        lines += ["", "Response tokens of each style in the scored corpus (mean over draws): "
                  + ", ".join(f"{st} {n:.0f}" for st, n in tokens.items()) + "."]
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
        paired = [(arm, c) for arm, c in rep["curve"].items() if "diff" in c]
        span = max(c["steps"][-1] for _, c in paired) if paired else 1
        for i, (arm, c) in enumerate(paired):
            x = np.array(c["steps"], dtype=float) + (i - (len(paired) - 1) / 2) * 0.008 * span  # side by side
            d = np.array(c["diff"])
            ax.errorbar(x, d, yerr=[d - np.array(c["lo"]), np.array(c["hi"]) - d], marker="o", capsize=3, label=arm)
        ax.axhline(0.0, color="grey", lw=0.8)

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

    figure("experiment_curve.png", "RL step", "held-out pass@1 minus uniform's",
           "Paired difference from uniform SFT over RL (mean over draws; bars: 95% t-interval)", curve)
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
    for key in ("gate", "sft_matters", "oracle"):
        sm = data.get(key) or {}
        if not all(np.isfinite(sm.get(x, np.nan)) for x in ("diff", "lo", "hi")):
            problems.append(f"{key} incomplete: {sm}")
    if "pear-token" in data.get("meta", {}).get("arms", []):
        primary = data.get("primary") or {}
        if not all(np.isfinite(primary.get(x, np.nan)) for x in ("diff", "lo", "hi", "mdd")) or \
                len(primary.get("per_world", [])) != len(worlds):
            problems.append(f"primary incomplete: {primary}")
        if "share" not in (data.get("recovered") or {}):
            problems.append("recovered missing")
    if "selection_worlds" not in data:
        problems.append("selection_worlds missing")
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
        if len(curve.get("pass@1", [])) != len(curve.get("steps", [None])) or not curve.get("steps") or \
                (arm != "uniform" and len(curve.get("diff", [])) != len(curve["steps"])):
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
