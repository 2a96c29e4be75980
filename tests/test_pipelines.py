"""Routing in pipelines/: which models get the embedded recipes."""
import json

from pipelines import rl as prl


def test_from_world_follows_the_provenance_chain(tmp_path, monkeypatch):
    world = tmp_path / "world"
    (world / "target").mkdir(parents=True)
    monkeypatch.setattr(prl, "WORLD", world)
    sft, rl, other, a, b = (tmp_path / x for x in ("elsewhere/sft", "rl", "other", "a", "b"))
    for folder in (sft, rl, other, a, b):
        folder.mkdir(parents=True)
    (sft / "train_summary.json").write_text(json.dumps({"model": str(world / "target")}))
    (rl / "rl_summary.json").write_text(json.dumps({"model": str(sft)}))
    (other / "train_summary.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B"}))
    (a / "rl_summary.json").write_text(json.dumps({"model": str(b)}))  # a loop ends, undecided = no
    (b / "rl_summary.json").write_text(json.dumps({"model": str(a)}))
    assert prl.from_world(str(world / "target"))
    assert prl.from_world(str(sft)) and prl.from_world(str(rl))  # wherever the folder is
    assert not prl.from_world(str(other)) and not prl.from_world(str(a))
    assert not prl.from_world(str(tmp_path / "missing"))


def test_command_line_flags_are_found_in_both_spellings():
    assert prl.gave(["--lr", "1e-3"], "--lr") and prl.gave(["--lr=1e-3"], "--lr")
    assert not prl.gave(["--lr-min", "1"], "--lr")
