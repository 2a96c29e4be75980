"""train.records: the per-step files of a run, fresh and resumed, and a step's line to its three places."""
import json

from train.records import read_lines, record_step, start_lines


class Seen:
    """A tracker and a progress bar that remember their calls."""

    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        self.calls.append(("log", step))

    def update(self, n):
        self.calls.append(("update", n))

    def set_postfix(self, **kw):
        self.calls.append(("postfix", kw))


def test_a_fresh_run_empties_the_file_and_a_resumed_one_keeps_its_checkpoints_steps(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    assert start_lines(path, None) == path and path.read_text() == ""  # its folder made
    seen = Seen()
    for step in (1, 2, 3):
        record_step({"step": step, "loss": 1.0 / step}, path, seen, seen, {"loss": f"{1.0 / step:.2f}"})
    assert path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    assert seen.calls[:3] == [("log", 1), ("update", 1), ("postfix", {"loss": "1.00"})]
    assert read_lines(path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]

    start_lines(path, 2)  # resumed after step 2: step 3 runs again
    assert [m["step"] for m in read_lines(path)] == [1, 2]
    start_lines(path, None)  # afresh
    assert read_lines(path) == []
    start_lines(tmp_path / "other" / "reward_errors.jsonl", 5)  # resumed, no file yet: none made
    assert not (tmp_path / "other" / "reward_errors.jsonl").exists()
