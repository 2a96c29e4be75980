"""Prompt sets of RL and evaluation: one reader for every file form and hub datasets, chat prompts
through the chat template, the answer column by flag, other trainers' flag names."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from common.config import parse
from train.eval import EvalConfig
from train.rl import RLConfig
from train.rollout import PromptConfig, prompt_token_ids, read_prompt_file, training_prompt_texts

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You add numbers. Put the answer after 'Answer:'."
ROWS = [
    {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}],
     "solution": 5, "task": "sum"},
    # an SFT row: the last assistant turn (its response) is left out of the prompt
    {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "Answer: 2"},
                  {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "Answer: 8"}],
     "solution": "8", "task": "sum"},
    {"prompt": "What is 7 + 0?", "solution": "7", "task": "sum"},
]


def write_forms(folder: Path) -> dict[str, Path]:
    """The same rows as JSONL, a pretty-printed JSON array, Parquet, and a folder of Parquet files."""
    folder.mkdir(parents=True, exist_ok=True)
    forms = {"jsonl": folder / "p.jsonl", "json": folder / "p.json", "parquet": folder / "p.parquet",
             "folder": folder / "parts"}
    forms["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    forms["json"].write_text(json.dumps(ROWS, indent=2))
    keys = ("messages", "prompt", "solution", "task")  # every row every column (from_pylist takes the first's)
    table = pa.Table.from_pylist([{k: str(r[k]) if k == "solution" else r.get(k) for k in keys} for r in ROWS])
    pq.write_table(table, forms["parquet"])
    forms["folder"].mkdir()
    pq.write_table(table.slice(0, 2), forms["folder"] / "a.parquet")
    pq.write_table(table.slice(2), forms["folder"] / "b.parquet")
    return forms


def test_every_file_form_gives_the_same_prompts(tmp_path):
    """JSONL, a JSON array (once an AttributeError), Parquet (every message given every key) and a
    folder: the same rows, with `messages` kept as the prompt and the answer from --answer-column."""
    got = {name: PromptConfig(prompts=str(path), answer_column="solution").examples()
           for name, path in write_forms(tmp_path).items()}
    for name, rows in got.items():
        assert [r["prompt"] for r in rows] == ["What is 2 + 3?", "And 4 + 4?", "What is 7 + 0?"], name
        assert [r["answer"] for r in rows] == ["5", "8", "7"], name
        assert rows[0]["messages"] == ROWS[0]["messages"], name
        assert rows[1]["messages"] == ROWS[1]["messages"][:3], name  # its response left out
        assert "messages" not in rows[2] or rows[2]["messages"] is None, name
        assert all(r["task"] == "sum" for r in rows), name


def test_bad_prompt_rows_name_the_row_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[2]) + "\n" + json.dumps({"question": "no prompt", "solution": 1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: needs a string `prompt` or a `messages` chat"):
        read_prompt_file(str(bad), "solution")
    with pytest.raises(ValueError, match=r"bad.jsonl row 0: no `answer` \(the answer column, --answer-column\)"):
        read_prompt_file(str(bad))
    only_assistant = tmp_path / "a.json"
    only_assistant.write_text(json.dumps([{"messages": [{"role": "assistant", "content": "hi"}], "answer": 1}]))
    with pytest.raises(ValueError, match="row 0: `messages` has no user turn"):
        read_prompt_file(str(only_assistant))
    pq.write_table(pa.table({"text": ["x"], "answer": ["1"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet: no `prompt` or `messages` column \(it has text, answer\)"):
        read_prompt_file(str(tmp_path / "t.parquet"))


def test_a_bad_prompt_file_is_one_line_and_exit_2(world, tmp_path, capsys):
    from train import eval as evaluation

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "What is 1 + 1?"}]))
    out = tmp_path / "e"
    assert evaluation.main(["--model", str(world / "target"), "--out", str(out), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad} row 0: no `answer` (the answer column, --answer-column)"]
    assert not out.exists()


@pytest.mark.parametrize("family", ["qwen2_5", "llama3"])
def test_chat_prompts_are_the_template_with_the_generation_prompt(family):
    """A `messages` prompt is the whole conversation through the chat template with the assistant turn
    opened, system prompt and earlier turns included; a text prompt is one user turn."""
    from tiny_tokenizers import tiny_tokenizer

    tok = tiny_tokenizer(family)
    ex = {"messages": ROWS[1]["messages"][:3], "prompt": "And 4 + 4?"}
    ids = prompt_token_ids(tok, ex)
    assert ids == tok.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    text = tok.decode(ids)
    assert "What is 1 + 1?" in text and "Answer: 2" in text and text.index("Answer: 2") < text.index("And 4 + 4?")
    without = tok.decode(tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=False))
    assert text.startswith(without.rstrip()) and len(text) > len(without.rstrip())  # the generation prompt
    with_system = tok.decode(prompt_token_ids(tok, {"messages": ROWS[0]["messages"], "prompt": "What is 2 + 3?"}))
    assert SYSTEM in with_system
    assert prompt_token_ids(tok, "What is 7 + 0?") == prompt_token_ids(tok, {"prompt": "What is 7 + 0?"}) == \
        prompt_token_ids(tok, {"messages": [{"role": "user", "content": "What is 7 + 0?"}], "prompt": "x"})


HUB_SCRIPT = """
import json
from train.rollout import PromptConfig, training_prompt_texts

rows = PromptConfig(prompts="org/sums", prompts_split="test", answer_column="solution").examples()
print(json.dumps({"rows": [[r["prompt"], r["answer"], r.get("messages")] for r in rows],
                  "source": PromptConfig(prompts="org/sums", prompts_split="test").source(),
                  "texts": sorted(training_prompt_texts("org/sums"))}))
"""


def test_hub_prompt_dataset_offline(tmp_path):
    """A hub dataset id as --prompts, split and answer column by flag, from a hub cache laid out as
    `hf download --repo-type dataset` leaves it (no network)."""
    from hub_cache import add_model

    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: default
          data_files:
          - split: train
            path: data/train.parquet
          - split: test
            path: data/test.parquet
        ---
        """))
    rows = pq.read_table(write_forms(tmp_path / "forms")["parquet"])  # (every split has the same columns)
    pq.write_table(rows.take([1]), folder / "data" / "train.parquet")
    pq.write_table(rows.take([0, 2]), folder / "data" / "test.parquet")  # a chat, a text prompt
    hf = tmp_path / "hf"
    add_model(hf / "hub", "org/sums", folder, kind="datasets")
    env = {"HF_HOME": hf, "HF_HUB_CACHE": hf / "hub", "HF_DATASETS_CACHE": hf / "datasets", "HF_HUB_OFFLINE": 1,
           "HF_DATASETS_OFFLINE": 1}
    import os

    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["rows"] == [["What is 2 + 3?", "5", ROWS[0]["messages"]], ["What is 7 + 0?", "7", None]]
    assert out["source"] == "org/sums:test"
    assert out["texts"] == ["And 4 + 4?", "What is 1 + 1?"]  # the default split, train


def test_training_texts_read_conversations_and_scoring_folders(tmp_path):
    """The held-out check's reader: every user turn of `messages`, `prompt` or `question`; a scoring
    output folder is its shards (its summary.json and rejects/ are not prompt sets)."""
    scores = tmp_path / "scores"
    (scores / "rejects").mkdir(parents=True)
    messages = pa.array([ROWS[1]["messages"], ROWS[0]["messages"]])  # list<struct<role, content>>
    pq.write_table(pa.table({"id": ["a", "b"], "messages": messages}), scores / "corpus-00000.parquet")
    pq.write_table(pa.table({"id": ["c"], "reason": ["too long"]}), scores / "rejects" / "rejects.parquet")
    (scores / "summary.json").write_text(json.dumps({"rows": 2}, indent=2))
    assert training_prompt_texts(str(scores)) == {"What is 1 + 1?", "And 4 + 4?", "What is 2 + 3?"}
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"question": " q "}) + "\n" + json.dumps({"prompt": "p", "question": "ignored"}) + "\n")
    assert training_prompt_texts(str(jsonl)) == {"q", "p"}


# ---- other trainers' flag names ----------------------------------------------------------------

TRL_NAMES = ["--num-generations", "4", "--beta", "0.05", "--epsilon", "0.1", "--max-completion-length", "32",
             "--learning-rate", "1e-5"]
OURS = {"samples_per_prompt": 4, "kl_coef": 0.05, "clip_low": 0.1, "clip_high": 0.1, "max_new_tokens": 32, "lr": 1e-5}


def test_trl_names_are_aliases_on_the_command_line_and_in_yaml(tmp_path):
    from dataclasses import asdict

    cli = parse(RLConfig, TRL_NAMES)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({"num_generations": 4, "beta": 0.05, "epsilon": 0.1, "max_completion_length": 32,
                                      "learning_rate": 1e-5}))
    from_yaml = parse(RLConfig, ["--config", str(recipe)])
    for cfg in (cli, from_yaml):
        assert {k: getattr(cfg, k) for k in OURS} == OURS
        # one name per setting in what a run records (and compares when it resumes)
        assert all(asdict(cfg)[k] is None for k in ("num_generations", "beta", "epsilon", "epsilon_high",
                                                   "max_completion_length", "learning_rate"))
    assert asdict(cli) == asdict(parse(RLConfig, ["--samples-per-prompt", "4", "--kl-coef", "0.05", "--clip-low",
                                                  "0.1", "--clip-high", "0.1", "--max-new-tokens", "32", "--lr",
                                                  "1e-5"]))
    # TRL's epsilon_high, and an explicit --clip-high, win over epsilon's default for it
    assert parse(RLConfig, ["--epsilon", "0.1", "--epsilon-high", "0.28"]).clip_high == 0.28
    assert parse(RLConfig, ["--epsilon", "0.1", "--clip-high", "0.3"]).clip_high == 0.3
    ev = parse(EvalConfig, ["--max-completion-length", "48", "--num-generations", "4"])
    assert (ev.max_new_tokens, ev.n, ev.max_completion_length, ev.num_generations) == (48, 4, None, None)


def test_an_alias_and_its_flag_with_two_values_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse(RLConfig, ["--num-generations", "4", "--samples-per-prompt", "6"])
    assert e.value.code == 2
    assert "--num-generations is another name for --samples-per-prompt: give one of them" in capsys.readouterr().err
    assert parse(RLConfig, ["--num-generations", "6", "--samples-per-prompt", "6"]).samples_per_prompt == 6
