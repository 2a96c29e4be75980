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
