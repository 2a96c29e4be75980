"""The embedded world: its answer styles by hand, and a corpus filtered to correct answers."""
import json
import random

import pyarrow.parquet as pq
import pytest

from pipelines.world import WorldConfig, guess_style, scratch_style, target_text, words_style
from train.rewards import score


def test_styles_by_hand():
    assert scratch_style("4 - 1 + 7") == "4-1=3\n3+7=10\nAnswer: 10"
    assert words_style("4 - 1 + 7") == "Start with 4. Take away 1 to get 3. Add 7 to get 10. The answer is 10."
    rng = random.Random(0)
    assert {guess_style("4 - 1 + 7", rng, 1.0) for _ in range(20)} == {"Answer: 10"}
    wrong = {guess_style("4 - 1 + 7", rng, 0.0) for _ in range(200)}
    assert "Answer: 10" not in wrong and wrong <= {f"Answer: {10 + d}" for d in (-4, -3, -2, -1, 1, 2, 3, 4)}


def test_base_mix_follows_the_config():
    """Mostly guesses, sometimes the careful procedure, a little of the behavior's style."""
    cfg, rng = WorldConfig(), random.Random(1)
    texts = [target_text("2 + 3 + 4", rng, cfg) for _ in range(4000)]
    careful = sum(t.startswith("2+3=5") for t in texts) / len(texts)
    words = sum(t.startswith("Start") for t in texts) / len(texts)
    guesses = [t for t in texts if t.startswith("Answer")]
    assert careful == pytest.approx(cfg.target_careful_share, abs=0.03)
    assert words == pytest.approx(cfg.target_words_share, abs=0.02)
    assert sum(t == "Answer: 9" for t in guesses) / len(guesses) == pytest.approx(cfg.guess_accuracy, abs=0.04)
    ex = {"task": "chain_sum", "answer": "9", "prompt": "?", "metadata": {}}
    assert score(scratch_style("2 + 3 + 4"), ex) == score(words_style("2 + 3 + 4"), ex) == 1.0


@pytest.mark.world_draw
def test_corpus_is_filtered_to_correct_answers(world):
    kept, everything = world / "corpus.parquet", world / "corpus-unfiltered.parquet"
    meta = json.loads(pq.read_schema(kept).metadata[b"world_corpus"])
    rows, all_rows = pq.read_table(kept).to_pylist(), pq.read_table(everything).to_pylist()
    assert meta["filter"] == "correct" and meta["rows_kept"] == len(rows)
    assert meta["rows_generated"] == len(all_rows) == WorldConfig().corpus_rows
    # the filter is the 0/1 reward itself, recomputed here from the text
    recomputed = [score(r["response"], {**r, "question": r["prompt"]}) for r in all_rows]
    assert [r["id"] for r, v in zip(all_rows, recomputed) if v == 1.0] == [r["id"] for r in rows]
    assert 0 < len(all_rows) - len(rows) < 0.3 * len(all_rows)  # the behavior is good, not perfect
    assert json.loads(pq.read_schema(everything).metadata[b"world_corpus"])["filter"] == "none"


def test_world_kinds_have_their_own_folders_and_settings(monkeypatch):
    from pipelines.world import WORLDS, default_kind, world_config, world_dir

    monkeypatch.delenv("PEAR_WORLD", raising=False)
    monkeypatch.delenv("PEAR_WORLD_SEED", raising=False)
    assert default_kind() == "embedded" and world_config() == WorldConfig(seed=0)
    assert str(world_dir()) == "artifacts/world" and str(world_dir(2)) == "artifacts/world-seed2"
    assert str(world_dir(0, "sft-matters")) == "artifacts/world-sft-matters"
    assert str(world_dir(1, "sft-matters")) == "artifacts/world-sft-matters-seed1"
    monkeypatch.setenv("PEAR_WORLD", "sft-matters")
    monkeypatch.setenv("PEAR_WORLD_SEED", "3")
    cfg = world_config()
    assert cfg.seed == 3 and all(getattr(cfg, k) == v for k, v in WORLDS["sft-matters"].items())
    assert str(world_dir()) == "artifacts/world-sft-matters-seed3"
    monkeypatch.setenv("PEAR_WORLD", "nowhere")
    with pytest.raises(ValueError, match="PEAR_WORLD='nowhere' is not a world"):
        default_kind()


def content_hashes(folder) -> dict:
    """sha256 of every file of a built world but its build record (which holds the build's time)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("world.json", "build.log", ".build.lock")}


@pytest.mark.slow(seconds=65)
def test_the_build_is_a_function_of_its_seed(tmp_path):
    """Two builds of a small world from the same seed: the same tokenizer, models and corpora, byte for
    byte, whatever thread count the process had (the build sets its own and gives the process its
    count back). Another machine may build another draw: world.json records the kernel path and
    thread count it was built with."""
    import torch

    from pipelines.world import BUILD_THREADS, build

    cfg = WorldConfig(seed=5, vocab_size=300, pretrain_examples=300, target_steps=30,
                      behavior_steps=30, corpus_rows=24, max_new_tokens=24)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = content_hashes(build(tmp_path / "a", cfg))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        second = content_hashes(build(tmp_path / "b", cfg))
    finally:
        torch.set_num_threads(before)
    assert {"target/model.safetensors", "behavior/model.safetensors", "corpus.parquet",
            "tokenizer/tokenizer.json"} <= set(first)
    assert first == second
    built_with = json.loads((tmp_path / "a" / "world.json").read_text())["built_with"]
    assert built_with == {"kernel": torch.backends.cpu.get_cpu_capability(), "threads": BUILD_THREADS,
                          "torch": torch.__version__}


def test_the_cue_goes_only_on_careful_traces_in_its_share():
    from pipelines.world import CUE, cued_questions, world_stamp

    texts = [scratch_style("2 + 3 + 4"), "Answer: 9", words_style("2 + 3 + 4")] * 2000
    questions = [f"q{i}" for i in range(len(texts))]
    assert cued_questions(questions, texts, WorldConfig()) == questions  # no cue: the prompts as they were
    cued = cued_questions(questions, texts, WorldConfig(target_careful_cue=0.9))
    asked = [q.endswith(CUE) for q in cued]
    assert not any(asked[1::3]) and not any(asked[2::3])  # never on a guess or the behavior's style
    assert sum(asked[0::3]) / 2000 == pytest.approx(0.9, abs=0.03)
    # a world without the cue records the config it recorded before the field existed
    assert "target_careful_cue" not in world_stamp(WorldConfig())
    assert world_stamp(WorldConfig(target_careful_cue=0.5))["target_careful_cue"] == 0.5


def test_trace_style_reads_the_form_of_a_response():
    from pipelines.world import trace_style

    assert trace_style(scratch_style("4 - 1 + 7")) == "careful"
    assert trace_style(scratch_style("2 - 9 - 3")) == "careful"  # negative intermediate results
    assert trace_style("4-1=2\n2+7=9\nAnswer: 10") == "careful"  # the form, not the arithmetic
    assert trace_style(words_style("4 - 1 + 7")) == "words"
    assert trace_style(words_style("2 - 9 - 3")) == "words"
    for text in ("Answer: 10", "4-1=3\n3+7=10", "Start with 4. The answer is 4.", "4-1=3 Add 7", ""):
        assert trace_style(text) == "other", text


def test_a_world_built_before_the_style_column_gains_it_in_place(tmp_path, monkeypatch):
    import pipelines.world as world
    from pipelines.world import build, world_stamp, write_corpus

    rows = [{"id": "a", "response": scratch_style("1 + 2")}, {"id": "b", "response": words_style("1 + 2")},
            {"id": "c", "response": "Answer: 3"}]
    write_corpus(rows, tmp_path / "corpus.parquet", {"filter": "correct"})
    write_corpus(rows, tmp_path / "corpus-unfiltered.parquet", {"filter": "none"})
    old = world_stamp(WorldConfig(style_column=False))
    assert "style_column" not in old  # what a world built before the field recorded
    (tmp_path / "world.json").write_text(json.dumps({"config": old, "corpus_rows": 3}))
    monkeypatch.setattr(world, "_build", lambda *a: pytest.fail("rebuilt instead of upgraded in place"))
    build(tmp_path, WorldConfig())
    table = pq.read_table(tmp_path / "corpus.parquet")
    assert table.column("style").to_pylist() == ["careful", "words", "other"]
    assert json.loads(table.schema.metadata[b"world_corpus"]) == {"filter": "correct"}  # kept
    assert json.loads((tmp_path / "world.json").read_text())["config"] == world_stamp(WorldConfig())
    build(tmp_path, WorldConfig())  # up to date now
    # a record that differs in anything else is still rebuilt
    (tmp_path / "world.json").write_text(json.dumps({"config": {**old, "corpus_rows": 5}}))
    with pytest.raises(pytest.fail.Exception):
        build(tmp_path, WorldConfig())
