"""The README's own-data run, as written: its files and its make commands, on tiny stand-ins for the
hub models it names, laid out in an offline hub cache under the same ids."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hub_cache import add_model
from test_make import ok

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own model, data, prompts and reward, end to end"


def readme_run() -> tuple[dict[str, str], list[str]]:
    """({file name: its text}, [make command lines]) of the README's own-data section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, re.S)
    files = {"chat.jsonl": blocks[0], "prompts.jsonl": blocks[1], "heldout.jsonl": blocks[2],
             "reward.py": blocks[3], "rl.yaml": blocks[4]}
    for name in files:  # each file is named in the prose before its block
        assert f"`{name}`" in section, name
    commands = [line for line in blocks[5].splitlines() if line.startswith("make ")]
    return files, commands


@pytest.mark.slow(seconds=95)
def test_the_readme_own_data_run_works_as_written(world, tmp_path):
    files, commands = readme_run()
    assert [c.split()[1] for c in commands] == ["score", "inspect", "sft", "eval", "rl", "eval"]
    # the hub ids the README names, as tiny models with one tokenizer (the world's: its template
    # takes system turns); not descended from the embedded world, so no embedded recipe applies
    cache = tmp_path / "hub"
    ids = re.findall(r"(?:TARGET|BEHAVIOR)=(\S+)", commands[0])
    add_model(cache, ids[0], world / "target")
    add_model(cache, ids[1], world / "behavior")
    # the files and runs/ of the README live in a folder of their own: relative names become its paths
    work = tmp_path / "work"
    work.mkdir()
    for name, text in files.items():
        (work / name).write_text(text)

    def local(text: str) -> str:
        for name in [*files, "runs/"]:
            text = re.sub(rf"(?<![\w/.]){re.escape(name)}", f"{work}/{name}", text)
        return text

    (work / "rl.yaml").write_text(local(files["rl.yaml"]))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    # the smallest run of each command: the README's sizes are for a real model
    smaller = {"rl": ["STEPS=2", "PROMPTS_PER_STEP=2", "SAMPLES_PER_PROMPT=2"], "eval": ["ARGS=--n 4 --k 1,4"]}
    # the result line each stage prints on the terminal (the quiet console: the rest goes to its log)
    runs = re.escape(f"{work}/runs")
    result_line = {"score": rf"^shards in {runs}/mine/", "inspect": rf"^histogram: {runs}/mine/log_weights\.png",
                   "sft": rf"^models in {runs}/mine-sft$", "eval": rf"^report in {runs}/mine-e[01]/eval\.json",
                   "rl": rf"^rl: 2 steps, mean reward .* model in {runs}/mine-rl$"}
    for line in commands:
        argv = shlex.split(local(line))
        r = subprocess.run([*argv[:1], "--no-print-directory", *argv[1:], *smaller.get(argv[1], [])], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
        ok(r, result_line[argv[1]])

    # what each stage left: chat shards scored on every assistant turn, a PEAR SFT folder, an RL
    # run on the README's prompts and reward, and the paired evaluation on the held-out prompts
    import polars as pl

    shards = pl.read_parquet(str(work / "runs/mine/*.parquet"))
    assert shards.height == 3 and shards.filter(pl.col("id") == "c2")["response_spans"].list.len().item() == 2
    assert (work / "runs/mine-sft/config.json").exists()
    rl = json.loads((work / "runs/mine-rl/rl_summary.json").read_text())
    assert rl["steps"] == 2 and "prompts.jsonl" in json.dumps(rl)
    report = json.loads((work / "runs/mine-e1/eval.json").read_text())
    assert report["vs_baseline"]["shared_prompts"] == 3
    assert report["config"]["reward"].endswith("reward.py:score")
