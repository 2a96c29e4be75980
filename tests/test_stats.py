"""Weight diagnostics accumulated batch by batch, and the shard-streaming reweight and inspect."""
import inspect as pyinspect
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scorer import report as inspect_cli
from scorer import reweight as reweight_cli
from scorer.reweight import reweight
from scorer.shards import META_KEY, ShardError, core_table, read_meta, write_atomic
from scorer.stats import BATCH_ROWS, QUANTILES, VariantStats, WeightStats, stats_of_shards
from scorer.weights import VARIANTS, WeightParams, ragged_weights

# a narrow log-weight clip so that both bounds are reached by the synthetic rows
PARAMS = WeightParams("token", 0.95, 3, (-0.08, 0.3), (-1.5, 2.0))
EXACT = ("weight_mean", "ess_tokens", "ess_tokens_fraction", "ess_sequences", "ess_sequences_fraction")



def weight_stats(weights, log_weights, target, behavior, params):
    """Reference: one accumulator fed everything at once."""
    acc = WeightStats(params)
    acc.add(weights, log_weights, target, behavior)
    return acc.result()


def all_variant_stats(target, behavior, params):
    """Reference: every variant's statistics of rows held in memory, added `BATCH_ROWS` at a time."""
    acc = VariantStats(params)
    for i in range(0, len(target), BATCH_ROWS):
        acc.add(target[i:i + BATCH_ROWS], behavior[i:i + BATCH_ROWS])
    return acc.result()

def synthetic_rows(n, seed=0, max_len=40):
    """Ragged float32 logprobs; about one row in ten is empty, log-ratios spread over both delta clips."""
    rng = np.random.default_rng(seed)
    target, behavior = [], []
    for _ in range(n):
        k = 0 if rng.random() < 0.1 else int(rng.integers(1, max_len))
        b = -rng.exponential(1.5, k)
        target.append((b + rng.normal(rng.normal(0.0, 0.3), 0.3, k)).astype(np.float32))  # per-row drift
        behavior.append(b.astype(np.float32))
    return target, behavior


def exact_stats(weights, log_weights, target, behavior, params):
    """The one-shot reference over all tokens at once (np.quantile, float64 sums)."""
    w = np.concatenate(weights).astype(np.float64)
    lw = np.concatenate(log_weights).astype(np.float64)
    delta = np.concatenate(target).astype(np.float64) - np.concatenate(behavior).astype(np.float64)
    seq_w = np.array([x.astype(np.float64).mean() for x in weights if len(x)])
    ess = lambda x: x.sum() ** 2 / (x * x).sum()
    lo, hi = params.log_weight_clip
    dlo, dhi = params.delta_clip
    return {
        "tokens": len(w), "sequences": len(seq_w),
        "weight_quantiles": {f"p{int(q * 100)}": np.quantile(w, q) for q in QUANTILES},
        "log_weight_quantiles": {f"p{int(q * 100)}": np.quantile(lw, q) for q in QUANTILES},
        "weight_mean": w.mean(),
        "share_at_log_weight_clip": {"lo": (lw <= lo + 1e-5).mean(), "hi": (lw >= hi - 1e-5).mean()},
        "share_at_delta_clip": {"lo": (delta <= dlo).mean(), "hi": (delta >= dhi).mean()},
        "ess_tokens": ess(w), "ess_tokens_fraction": ess(w) / len(w),
        "ess_sequences": ess(seq_w), "ess_sequences_fraction": ess(seq_w) / len(seq_w),
    }


def assert_matches_exact(got, want):
    """Counts and sums to 1e-9 relative; quantiles within one histogram bin."""
    res = got["quantile_resolution"]
    assert (got["tokens"], got["sequences"]) == (want["tokens"], want["sequences"])
    for k in EXACT:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k
    for k in ("share_at_log_weight_clip", "share_at_delta_clip"):
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    for p, x in want["log_weight_quantiles"].items():
        assert abs(got["log_weight_quantiles"][p] - x) <= res, p
    for p, x in want["weight_quantiles"].items():
        assert abs(math.log(got["weight_quantiles"][p] / x)) <= res, p


def test_batches_merged_equal_one_shot_for_every_variant():
    target, behavior = synthetic_rows(300)
    for variant in VARIANTS:
        p = WeightParams(variant, PARAMS.gamma, PARAMS.block_size, PARAMS.delta_clip, PARAMS.log_weight_clip)
        w, lw = ragged_weights(target, behavior, p)
        parts = []
        for a, b in [(0, 7), (7, 150), (150, 151), (151, 300)]:
            acc = WeightStats(p)
            acc.add(w[a:b], lw[a:b], target[a:b], behavior[a:b])
            parts.append(acc)
        merged = parts[0]
        for acc in parts[1:]:
            merged.merge(acc)
        got = merged.result()
        assert_matches_exact(got, exact_stats(w, lw, target, behavior, p))
        # the histogram merges exactly: same quantiles as one accumulator fed everything
        one = weight_stats(w, lw, target, behavior, p)
        assert got["log_weight_quantiles"] == one["log_weight_quantiles"]
        assert got["weight_quantiles"] == one["weight_quantiles"]
    ref = exact_stats(*ragged_weights(target, behavior, PARAMS), target, behavior, PARAMS)
    assert all(v > 0 for k in ("share_at_delta_clip", "share_at_log_weight_clip") for v in ref[k].values())


def test_quantiles_of_a_known_distribution():
    # log G uniform on the clip range [-1.5, 2]: the q-quantile is -1.5 + 3.5q; weights are exp of it
    lw = np.linspace(-1.5, 2.0, 35001).astype(np.float32)
    rows = np.array_split(lw, 100)
    acc = WeightStats(PARAMS)
    zeros = [np.zeros_like(r) for r in rows]
    acc.add([np.exp(r) for r in rows], rows, zeros, zeros)
    st = acc.result()
    res = st["quantile_resolution"]
    assert res == pytest.approx(3.5 / 2 ** 16)
    for q in QUANTILES:
        assert st["log_weight_quantiles"][f"p{int(q * 100)}"] == pytest.approx(-1.5 + 3.5 * q, abs=res)
        assert st["weight_quantiles"][f"p{int(q * 100)}"] == pytest.approx(math.exp(-1.5 + 3.5 * q), rel=res)
    assert st["log_weight_quantiles"]["p0"] == -1.5 and st["log_weight_quantiles"]["p100"] == 2.0  # exact ends
    assert st["share_at_log_weight_clip"] == {"lo": 1 / 35001, "hi": 1 / 35001}  # the two ends


def test_tokens_piled_at_a_clip_bound():
    # 90% of tokens at the upper clip: p50 and above are that bound, within a bin
    lw = np.array([2.0] * 90 + [0.0] * 10, np.float32)
    acc = WeightStats(PARAMS)
    acc.add([np.exp(lw)], [lw], [lw], [lw])
    st = acc.result()
    assert st["share_at_log_weight_clip"]["hi"] == pytest.approx(0.9)
    assert st["log_weight_quantiles"]["p50"] == pytest.approx(2.0, abs=st["quantile_resolution"])
    assert st["log_weight_quantiles"]["p5"] == 0.0 and st["sequences"] == 1


def test_empty_input():
    assert WeightStats(PARAMS).result() == {"tokens": 0, "sequences": 0}
    acc = WeightStats(PARAMS)
    acc.add([np.zeros(0, np.float32)] * 3, [np.zeros(0, np.float32)] * 3, [np.zeros(0)] * 3, [np.zeros(0)] * 3)
    assert acc.merge(WeightStats(PARAMS)).result() == {"tokens": 0, "sequences": 0}
    assert all_variant_stats([], [], PARAMS) == {v: {"tokens": 0, "sequences": 0} for v in VARIANTS}


def test_merge_refuses_other_clips():
    with pytest.raises(ValueError):
        WeightStats(PARAMS).merge(WeightStats(WeightParams(log_weight_clip=(-1.0, 1.0))))


def make_table(target, behavior, params=PARAMS, first_id=0):
    """A scored table through `scorer.shards.core_table`, one prompt token per row."""
    n = len(target)
    input_ids = [np.arange(len(t) + 1) for t in target]
    if "spans" in pyinspect.signature(core_table).parameters:  # schema version 2 takes response spans
        third = [[(1, len(x))] for x in input_ids]
    else:
        third = [1] * n
    weights, _ = ragged_weights(target, behavior, params)
    return core_table([f"r{first_id + i}" for i in range(n)], input_ids, third, target, behavior, weights)


def write_shards(folder, parts, params=PARAMS):
    """One shard per (target, behavior) part, named corpus-0000i.parquet, with `pear` metadata."""
    folder.mkdir(exist_ok=True)
    meta = {"schema_version": 1, **params.as_dict()}
    paths, first = [], 0
    for i, (t, b) in enumerate(parts):
        paths.append(folder / f"corpus-{i:05d}.parquet")
        write_atomic(make_table(t, b, params, first), paths[-1], meta)
        first += len(t)
    return paths


def assert_same_stats(a, b):
    assert set(a) == set(b)
    for v in a:
        assert a[v].keys() == b[v].keys(), v
        for k, x in a[v].items():
            if isinstance(x, dict):
                assert x == pytest.approx(b[v][k], rel=1e-9, abs=1e-12), (v, k)
            else:
                assert x == pytest.approx(b[v][k], rel=1e-9), (v, k)


def test_stats_of_shards_equals_all_variant_stats_of_the_rows(tmp_path):
    target, behavior = synthetic_rows(500, seed=1)
    cuts = [0, 120, 121, 500]
    paths = write_shards(tmp_path / "s", [(target[a:b], behavior[a:b]) for a, b in zip(cuts, cuts[1:])])
    want = all_variant_stats(target, behavior, PARAMS)
    assert_same_stats(stats_of_shards(paths, PARAMS), want)
    assert want["none"]["tokens"] == sum(len(x) for x in target)
    # small batches (slices of row groups) give the same numbers
    acc = VariantStats(PARAMS)
    for p in paths:
        acc.add_shard(p, batch_rows=7)
    assert_same_stats(acc.result(), want)
    assert (acc.rows, acc.tokens) == (500, want["none"]["tokens"])


def test_a_shard_without_rows(tmp_path):
    paths = write_shards(tmp_path / "s", [([], [])])
    assert stats_of_shards(paths, PARAMS) == {v: {"tokens": 0, "sequences": 0} for v in VARIANTS}
    reweight(tmp_path / "s", PARAMS)
    assert pq.read_table(paths[0]).num_rows == 0 and read_meta(paths[0])["gamma"] == PARAMS.gamma


def truncate_copy(src, dst):
    dst.write_bytes(src.read_bytes()[:200])


@pytest.fixture
def folder_with_bad_shard(tmp_path):
    """Three good shards and a truncated fourth (last in order, so the good ones are staged first)."""
    target, behavior = synthetic_rows(90, seed=2)
    folder = tmp_path / "scores"
    paths = write_shards(folder, [(target[i:i + 30], behavior[i:i + 30]) for i in (0, 30, 60)])
    bad = folder / "corpus-00003.parquet"
    truncate_copy(paths[0], bad)
    (folder / "summary.json").write_text(json.dumps({"rows_in": 90}))
    return folder, paths, bad


def test_reweight_leaves_the_folder_untouched_when_a_shard_is_bad(folder_with_bad_shard, capsys):
    folder, paths, bad = folder_with_bad_shard
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ShardError, match=f"{bad}: cannot read"):
        reweight(folder, WeightParams("block", 0.99, 2))
    assert reweight_cli.main(["--scores", str(folder), "--variant", "block"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: cannot read (" in err
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}  # the CLI holds OUT's lock
    assert after == before  # same files, byte for byte


def test_reweight_rewrites_weights_and_keeps_other_columns_and_metadata(folder_with_bad_shard):
    folder, paths, bad = folder_with_bad_shard
    bad.unlink()
    # a newer schema's extra columns and another metadata key must pass through
    for i, p in enumerate(paths):
        t = pq.read_table(p)
        spans = pa.array([[{"start": 1, "end": 1 + len(x)}] for x in t.column("weights").to_pylist()],
                         pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())])))
        t = t.append_column("extra_spans", spans).append_column("task", pa.array([f"t{i}"] * t.num_rows))
        t = t.replace_schema_metadata({**t.schema.metadata, b"origin": b"synthetic"})
        pq.write_table(t, p, compression="zstd", row_group_size=8)
    before = {p: pq.read_table(p) for p in paths}
    params = WeightParams("block", 0.99, 2)

    summary = reweight(folder, params)

    target, behavior = [], []
    for p in paths:
        after = pq.read_table(p)
        old = before[p]
        assert after.drop_columns(["weights"]).equals(old.drop_columns(["weights"]))
        assert after.schema.equals(old.schema)  # column order and types
        md = dict(after.schema.metadata)
        assert md[b"origin"] == b"synthetic" and set(md) == set(old.schema.metadata)
        assert json.loads(md[META_KEY]) == {**json.loads(old.schema.metadata[META_KEY]), **params.as_dict()}
        assert pq.ParquetFile(p).num_row_groups == 4  # 30 rows in groups of 8, as written
        t = [np.asarray(x, np.float32) for x in after.column("target_logprobs").to_pylist()]
        b = [np.asarray(x, np.float32) for x in after.column("behavior_logprobs").to_pylist()]
        w, _ = ragged_weights(t, b, params)
        for stored, expected in zip(after.column("weights").to_pylist(), w):
            assert stored == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-7)
        target += t
        behavior += b
    assert read_meta(paths[0])["variant"] == "block"
    # no temporaries; the reweight's line in the history
    expected = [p.name for p in paths] + ["summary.json", "history.jsonl"]
    assert sorted(x.name for x in folder.iterdir()) == sorted(expected)
    history = [json.loads(x) for x in (folder / "history.jsonl").read_text().splitlines()]
    assert [h["reweighted"]["params"] for h in history] == [params.as_dict()]
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["rows_in"] == 90 and on_disk["params"] == params.as_dict()
    assert_same_stats(summary["variants"], all_variant_stats(target, behavior, params))


def test_inspect_draws_one_panel_per_weighted_variant(tmp_path):
    target, behavior = synthetic_rows(60, seed=3)
    folder = tmp_path / "scores"
    write_shards(folder, [(target[:30], behavior[:30]), (target[30:], behavior[30:])])
    png = tmp_path / "h.png"
    assert inspect_cli.main(["--scores", str(folder), "--png", str(png)]) == 0
    assert png.stat().st_size > 0

    acc = VariantStats(PARAMS, variants=tuple(v for v in VARIANTS if v != "none"))
    acc.add(target, behavior)
    fig = inspect_cli.plot_log_weights(acc.stats, "token", "t")
    assert [ax.get_title() for ax in fig.axes] == [v + (" (in shards)" if v == "token" else "")
                                                   for v in VARIANTS if v != "none"]
    # the grid follows the number of variants: a fourth is drawn, not dropped
    four = {f"v{i}": st for i, st in enumerate([*acc.stats.values(), acc.stats["token"]])}
    assert len(inspect_cli.plot_log_weights(four, "v0", "t").axes) == 4


@pytest.mark.parametrize("bad_name", ["corpus-00000.parquet", "corpus-00009.parquet"])
def test_inspect_exits_2_naming_a_corrupt_shard(tmp_path, capsys, bad_name):
    target, behavior = synthetic_rows(20, seed=4)
    folder = tmp_path / "scores"
    paths = write_shards(folder, [(target[:10], behavior[:10]), (target[10:], behavior[10:])])
    bad = folder / bad_name
    truncate_copy(paths[1], bad)
    assert inspect_cli.main(["--scores", str(folder), "--png", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: cannot read (" in err
    assert not (tmp_path / "h.png").exists()
