"""The make targets as a user types them: the variables each takes, and every documented target run
through make itself at its smallest size."""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the program(s) behind each target whose variables become flags: every flag make writes must be one
# of theirs (pipelines.rl passes what follows its verb to train.rl or train.eval)
PROGRAMS = {
    "demo": ["pipelines.demo"], "world": ["pipelines.world"], "score": ["pipelines.score"],
    "reweight": ["scorer.reweight"], "export": ["scorer.export"], "inspect": ["scorer.report"],
    "sft": ["pipelines.sft"], "rl": ["train.rl"], "eval": ["train.eval"],
    "experiment": ["pipelines.experiment"], "experiment-smoke": ["pipelines.experiment"],
    "bench": ["bench.score_cpu", "bench.bench_sft"], "bench-sft": ["bench.bench_sft"],
    "bench-scale": ["bench.bench_scale"], "bench-rl": ["bench.bench_rl_memory"],
}


def make(*args, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def help_table() -> dict[str, list[str]]:
    """target -> its variables, as `make help` prints them."""
    lines = make("help").stdout.splitlines()
    table = {}
    for name_line, vars_line in zip(lines[1::2], lines[2::2]):
        if not name_line.startswith("  "):
            break
        table[name_line.split()[0]] = [] if vars_line.strip() == "-" else vars_line.split()
    return table


def test_help_and_the_readme_list_the_same_targets_and_variables():
    table = help_table()
    documented = {"setup", "demo", "world", "score", "reweight", "export", "inspect", "sft", "rl", "eval",
                  "experiment-smoke", "bench", "bench-sft", "bench-scale", "lint", "test"}
    assert documented <= set(table)
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `make ([a-z-]+)` \| [^|]+ \| ([^|]+) \|$", readme, re.M)
    in_readme = {t: re.findall(r"`([A-Z_]+)`", v) for t, v in rows}
    assert in_readme == table
    assert "every target takes: ARGS VERBOSE WORLD WORLD_SEED VENV" in make("help").stdout


def test_a_variable_no_target_takes_stops_make_naming_it():
    r = make("rl", "-n", "MODEL=m", "ACTORS=2")
    assert r.returncode == 2 and "ACTORS: not a variable of rl" in r.stderr
    r = make("nosuch", "-n")
    assert r.returncode == 2 and "no target nosuch" in r.stderr
    # several goals: a variable of either is fine
    assert make("score", "sft", "-n", "ACTORS=2", "LORA_RANK=4").returncode == 0
    # a variable in the environment is not the user's word for this command: no error
    assert make("rl", "-n", env={"ACTORS": "2"}).returncode == 0


def test_variables_reach_their_programs_as_flags():
    r = make("rl", "-n", "MODEL=m", "PROMPTS=p.jsonl", "REWARD=r.py:score", "ARGS=--beta 0.1")
    cmd = r.stdout.splitlines()[-1]
    assert "--model='m'" in cmd and "--prompts='p.jsonl'" in cmd and "--reward='r.py:score'" in cmd
    assert cmd.endswith("--beta 0.1")
    cmd = make("score", "-n", "ACTORS=3", "MAX_LEN=100", "SPLIT=test", "DELTA_CLIP=-0.08,0.3").stdout
    assert "--actors='3'" in cmd and "--max-len='100'" in cmd and "--data-split='test'" in cmd
    assert "--delta-clip='-0.08,0.3'" in cmd
    cmd = make("sft", "-n", "LORA_RANK=4", "REPORT_TO=tensorboard").stdout
    assert "--lora-rank='4'" in cmd and "--report-to='tensorboard'" in cmd
    # ARGS of `make test` go to pytest, not to the world build it depends on
    lines = make("test", "-n", "ARGS=-k nothing").stdout.splitlines()
    assert lines[-1].endswith("-k nothing") and not any("pipelines.world" in x and "-k" in x for x in lines)


def test_every_variable_is_a_flag_of_its_program():
    table = help_table()

    def helptext(module: str) -> str:
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (module, r.stderr[-2000:])
        return r.stdout

    modules = sorted({m for ms in PROGRAMS.values() for m in ms})
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(modules, pool.map(helptext, modules)))
    for target, programs in PROGRAMS.items():
        cmd = make(target, "-n", *[f"{v}=x" for v in table[target]]).stdout
        for v in table[target]:
            flag = "--data-split" if v == "SPLIT" else "--" + v.lower().replace("_", "-")
            assert re.search(rf" {flag}(=|\s|$)", cmd, re.M), (target, v, cmd)
            assert any(re.search(rf"(^|\s){flag}\b", helps[m], re.M) for m in programs), (target, flag)


# ---- every documented target, through make, at its smallest size --------------------------------
# (CI runs `make setup`, `make lint` and `make test`, which runs `make world`; test_readme_own_run.py
# runs score, inspect, sft, eval and rl as the README writes them; experiment-smoke runs in
# test_experiment.py)

def ok(r: subprocess.CompletedProcess, line: str) -> str:
    """The target exited 0 and printed `line` (a regular expression) on the terminal."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(line, r.stdout + r.stderr, re.M), (line, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout + r.stderr  # what the terminal shows


@pytest.mark.slow(seconds=10)
def test_reweight_and_export_run_as_documented(scores, tmp_path):
    s = tmp_path / "scores"
    shutil.copytree(scores, s)  # the session's scored corpus (conftest): reweight rewrites shards in place
    ok(make("reweight", f"SCORES={s}", "VARIANT=block", timeout=300), rf"^reweighted {s} with .*'variant': 'block'")
    ok(make("export", f"SCORES={s}", f"OUT={tmp_path / 'export'}", "CONVENTION=trl", timeout=300),
       rf"^exported 96 rows in 2 shards to {tmp_path / 'export'} \(trl\)")


@pytest.mark.slow(seconds=50)
def test_demo_runs_at_smoke_size(world, tmp_path):
    out = ok(make("demo", f"OUT={tmp_path}", "ARGS=--smoke", timeout=1200), r"^== demo done in \d+s")
    assert re.search(r"^\| uniform \| \d+ \| [01]\.\d{3} \| [01]\.\d{3} \|", out, re.M)
    assert re.search(r"^\| pear \| \d+ \|", out, re.M)


@pytest.mark.slow(seconds=100)
def test_the_benchmarks_run_at_their_smallest(scores, tmp_path):
    """Their result lines reach the terminal through the quiet console, and nothing else of theirs
    does; the JSON goes to $OUT (not bench/results/)."""
    env = {"OUT": str(tmp_path / "results")}
    # one whole Ray job, of the torch backend with two actors: the others are the same code path
    out = ok(make("bench", "ROWS=64", f"SCORES={scores}", "STEPS=2", "ARGS=--ray-backends torch --ray-actors 2",
                  env=env, timeout=1200),
             r"^PEAR/uniform step time: \d")
    assert re.search(r"^vllm: [\d,]+ tokens/s .* ratio vs torch: \d", out, re.M)
    assert re.search(r"^ray_torch_2_actor: wall", out, re.M)
    assert not re.search(r"USDT|Warning|NUMA", out), out  # other libraries' lines stay in the log
    out = ok(make("bench-scale", "SIZES=100,200", f"ARGS=--out {tmp_path / 'work'}", env=env, timeout=1200),
             r"^peak RSS ratio 200 / 100 rows: driver \d")
    for name in ("score_cpu.json", "bench_sft.json", "bench_scale.json"):
        assert (tmp_path / "results" / name).exists()


def test_the_readme_says_what_the_code_does():
    from pipelines.experiment_report import PNGS

    readme = (ROOT / "README.md").read_text()
    # the experiment's plots: the same count wherever the README gives it
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    assert set(re.findall(r"\b(\w+) plots\b", readme)) - {"and"} == {words[len(PNGS)]}  # "prints it and plots"
    # evaluation of a model trained from bucket shards works (tests/test_object_storage.py checks its
    # held-out check there); the section once said it stops
    scaling = readme.split("\n## Scaling out")[1].split("\n## ")[0]
    assert "`make eval` of a model trained from shards in a bucket works" in scaling
    assert "Not yet" not in scaling
