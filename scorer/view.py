"""See the weights: one self-contained HTML page of scored rows, every token coloured by its PEAR weight.

    python -m scorer.view --scores runs/score                   # writes runs/score/weights.html
    python -m scorer.view --scores runs/score --n 20 --where "mean_weight < 0.5 AND length > 100"
    python -m scorer.view --scores runs/score --ids row-7,row-9 --variant sequence --compare token

Which rows: the N lowest and the N highest mean weight and N drawn at random (seeded), among the
rows that WHERE keeps (a polars SQL expression over `id`, `mean_weight`, `ess`, `length`,
`response_tokens` and the corpus's own columns), and every row that IDS names. Choosing them reads
only the columns it needs, a batch of rows at a time: memory stays flat whatever the corpus size.

The weights are recomputed from the stored logprobs, as `make reweight` would compute them, with
the constants given and the shards' own for the others; nothing is written but the page. The page
needs no server and no network: its styles, script and data are inside it.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import ConfigError, cli, field
from common.storage import TMP_PREFIX, as_path, replace
from scorer.config import WeightConfig
from scorer.reweight import stored_params
from scorer.shards import NotAShard, ShardError, list_shards, read_meta, spans_of, tokenizer_sha256
from scorer.stats import BATCH_ROWS, LOGPROB_COLUMNS, VariantStats, ess, logprob_rows, weight_table
from scorer.tokentext import decoder, token_texts
from scorer.weights import VARIANTS, WeightParams, ragged_weights

TEMPLATE = Path(__file__).with_name("view.html")
ROW_COLUMNS = ("id", "mean_weight", "ess", "length", "response_tokens")  # what WHERE takes, with the corpus's own
PASSTHROUGH_CHARS = 2000  # a corpus column's text on the page is cut after this many characters

# ColorBrewer's RdBu, 11 classes (colour-blind safe): red where the log-weight is below 0, blue above
PALETTE_NAME = "ColorBrewer RdBu, 11 classes (colour-blind safe)"
PALETTE = ("#67001f", "#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7",
           "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061")
PAGE_BACKGROUND = "#ffffff"
CONTEXT_TEXT = "#595959"  # context tokens: grey on the page
TIP_BACKGROUND, TIP_TEXT = "#1f1f1f", "#ffffff"
WCAG_AA = 4.5


@dataclass
class ViewConfig:
    """A page of scored rows, every token coloured by its PEAR weight."""

    GROUP_DEFAULTS: ClassVar[str] = "the shards' own"

    scores: str = field("runs/score", "scoring output folder (local, s3:// or gs://)")
    html: str = field("", "the page to write; empty: SCORES/weights.html")
    tokenizer: str = field("", "tokenizer folder or hub id; empty: the shards' target model's. It must match "
                               "the shards' tokenizer_sha256")
    n: int = field(10, "rows of each kind: the N lowest and the N highest mean weight, and N at random")
    seed: int = field(0, "seed of the rows drawn at random")
    ids: tuple[str, ...] = field((), "ids of rows to add, comma-separated")
    where: str = field("", "keep only the rows this polars SQL expression is true of (columns: "
                           f"{', '.join(ROW_COLUMNS)} and the corpus's own), e.g. \"mean_weight < 0.5\"")
    compare: str = field("", f"a second variant shown beside each row, same constants: {', '.join(VARIANTS)}")
    weights: WeightConfig = field(WeightConfig(), "PEAR weighting: --variant, --gamma, --block-size, --delta-clip, "
                                                  "--log-weight-clip; those not given keep the shards' values")

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"--n must be >= 0, got {self.n}")
        if self.compare and self.compare not in VARIANTS:
            raise ValueError(f"--compare must be one of {VARIANTS}, got {self.compare!r}")


# ---- colours: the pure part, tested alone -------------------------------------------------------

def relative_luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a #rrggbb colour."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours (1 to 21)."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(background: str) -> str:
    """Black or white, whichever stands out more on `background`."""
    return max(("#000000", "#ffffff"), key=lambda c: contrast(c, background))


def colour_class(log_weight: float, scale: float) -> int:
    """The palette entry of a log-weight on a scale of [-scale, scale] centred at 0 (ends clamped)."""
    k = len(PALETTE)
    return int(min(max(math.floor((log_weight + scale) / (2 * scale) * k), 0), k - 1))


def page_scale(log_weights: list[np.ndarray]) -> float:
    """Half-width of the colour scale: the largest |log G| on the page, rounded up to a tenth."""
    top = max((float(np.abs(x).max()) for x in log_weights if len(x)), default=0.0)
    return max(math.ceil(top * 10 - 1e-9) / 10, 0.1)


# ---- which rows ----------------------------------------------------------------------------------

def parse_where(where: str, columns: list[str]):
    """The polars expression of WHERE (polars parses it: nothing is evaluated as Python), or None;
    ConfigError when it does not parse or names a column the rows do not have."""
    import polars as pl

    if not where.strip():
        return None
    try:
        expr = pl.sql_expr(where)
        names = expr.meta.root_names()
    except pl.exceptions.PolarsError as e:
        raise ConfigError(f"--where {where!r} does not parse: {one_line(e)}") from None
    unknown = sorted(set(names) - set(columns))
    if unknown:
        raise ConfigError(f"--where {where!r} names {', '.join(unknown)}: the columns are {', '.join(columns)}")
    return expr


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def row_stats(weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: mean weight, ESS (sum w)^2 / sum w^2, and token count (an empty row: 0, 0, 0)."""
    lengths = np.array([len(x) for x in weights], dtype=np.int64)
    flat = np.concatenate(weights).astype(np.float64) if lengths.sum() else np.zeros(0)
    row = np.repeat(np.arange(len(weights)), lengths)
    s1 = np.bincount(row, weights=flat, minlength=len(weights))
    s2 = np.bincount(row, weights=flat * flat, minlength=len(weights))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(lengths > 0, s1 / np.maximum(lengths, 1), 0.0),
                np.where(s2 > 0, s1 * s1 / s2, 0.0), lengths)


@dataclass
class Choice:
    """The rows a page shows: per row its shard, its row number there and why it was chosen."""

    rows: list[tuple[int, int, list[str]]]
    seconds: float  # the pass over the corpus, wall time
    cpu_seconds: float  # and the CPU time of this process in it (a fair measure on a shared machine)
    corpus_rows: int
    kept_rows: int  # rows WHERE kept


def choose_rows(shards: list, params: WeightParams, n: int, seed: int, ids: tuple[str, ...], where,
                where_names: list[str], stats: VariantStats) -> Choice:
    """One pass over the shards, a batch of rows at a time, reading only the logprobs, the ids and the
    columns WHERE names. Adds every row to `stats`. Ties are broken by position (first shard first)."""
    import polars as pl

    t0, c0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    keep = {"lowest": None, "highest": None, "random": None}
    order = {"lowest": ("mean_weight", False), "highest": ("mean_weight", True), "random": ("key", False)}
    named, total, kept = [], 0, 0
    want = set(ids)
    for s, path in enumerate(shards):
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{path}: cannot read ({e})") from None
        own = [c for c in where_names if c not in ROW_COLUMNS or c == "length"]
        cols = ["id", *LOGPROB_COLUMNS, *("input_ids" if c == "length" else c for c in own)]
        missing = [c for c in cols if c not in pf.schema_arrow.names]
        if missing:
            raise ShardError(f"{path}: missing columns {missing}")
        first = 0
        with pf:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                target, behavior = logprob_rows(batch, path, first)
                try:
                    w = stats.add(target, behavior)[params.variant][0]
                except ValueError as e:
                    raise ShardError(f"{path}: rows from {first}: {e}") from None
                m = batch.num_rows
                mean, row_ess, lengths = row_stats(w)
                frame = pl.DataFrame({
                    "shard": np.full(m, s), "row": np.arange(first, first + m), "id": batch.column("id").to_pylist(),
                    "mean_weight": mean, "ess": row_ess, "response_tokens": lengths, "key": rng.random(m)})
                if "length" in where_names:
                    offsets = batch.column("input_ids").offsets.to_numpy()
                    frame = frame.with_columns(length=pl.Series(np.diff(offsets)))
                for c in own:
                    if c != "length":
                        frame = frame.with_columns(pl.from_arrow(batch.column(c)).alias(c))
                if want:
                    named.append(frame.filter(pl.col("id").is_in(list(want))).select("shard", "row", "id"))
                if where is not None:
                    try:
                        frame = frame.filter(where)
                    except pl.exceptions.PolarsError as e:
                        raise ConfigError(f"--where cannot be evaluated on the rows: {one_line(e)}") from None
                kept += frame.height
                frame = frame.select("shard", "row", "mean_weight", "key")
                for kind, (col, desc) in order.items():
                    both = frame if keep[kind] is None else pl.concat([keep[kind], frame])
                    keep[kind] = both.sort([col, "shard", "row"], descending=[desc, False, False]).head(n)
                total += m
                first += m
    found = pl.concat(named) if named else pl.DataFrame({"id": []}, schema={"id": pl.String})
    absent = sorted(want - set(found["id"].to_list()))
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise ConfigError(f"--ids: {', '.join(map(repr, absent[:3]))}{more} not in {len(shards)} shards")
    picked: dict[tuple[int, int], list[str]] = {}
    for kind in ("lowest", "highest", "random"):
        for s, r in (keep[kind].select("shard", "row").iter_rows() if keep[kind] is not None else []):
            picked.setdefault((s, r), []).append(kind)
    for s, r, _ in (found.iter_rows() if named else []):
        picked.setdefault((s, r), []).append("named")
    rows = [(s, r, kinds) for (s, r), kinds in picked.items()]
    return Choice(rows, time.perf_counter() - t0, time.process_time() - c0, total, kept)


# ---- the chosen rows, read whole ----------------------------------------------------------------

def read_rows(path, wanted: list[int], passthrough: list[str]) -> dict[int, dict]:
    """{row number: its columns} of some rows of one shard, reading only the row groups that hold them."""
    out = {}
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    with pf:
        cols = [c for c in pf.schema_arrow.names if c in ("id", "input_ids", "prompt_len", "response_spans",
                                                           *LOGPROB_COLUMNS) or c in passthrough]
        first = 0
        for g in range(pf.num_row_groups):
            m = pf.metadata.row_group(g).num_rows
            here = [r for r in wanted if first <= r < first + m]
            if here:
                table = pf.read_row_group(g, columns=cols).take(pa.array([r - first for r in here]))
                target, behavior = logprob_rows(table, path, first)
                spans = spans_of(table)
                records = table.select([c for c in cols if c in passthrough]).to_pylist()
                for i, r in enumerate(here):
                    out[r] = {"id": table.column("id")[i].as_py(), "input_ids": table.column("input_ids")[i].as_py(),
                              "spans": spans[i], "target": target[i], "behavior": behavior[i],
                              "passthrough": records[i]}
            first += m
    return out


def shown(value) -> str:
    """A corpus value as page text: strings as they are, the rest as JSON; long text cut."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= PASSTHROUGH_CHARS else text[:PASSTHROUGH_CHARS] + f"… ({len(text)} characters)"


def row_record(row: dict, kinds: list[str], tokenizer, decode, weighings: list[tuple[np.ndarray, np.ndarray]],
               delta_clip: tuple[float, float]) -> dict:
    """A row as the page's script takes it (numbers rounded to 4 decimals; the page shows 4 digits)."""
    texts, partial = token_texts(tokenizer, row["input_ids"], decode)
    t, b = row["target"].astype(np.float64), row["behavior"].astype(np.float64)
    rec = {"id": row["id"], "kinds": kinds, "length": len(row["input_ids"]), "tokens": len(t),
           "spans": [list(sp) for sp in row["spans"]], "ids": row["input_ids"], "text": texts,
           "bytes": {str(k): v for k, v in partial.items()},
           "t": np.round(t, 4).tolist(), "b": np.round(b, 4).tolist(),
           "d": np.round(np.clip(t - b, *delta_clip), 4).tolist(),
           "pass": [[k, shown(v)] for k, v in row["passthrough"].items()]}
    for i, (w, lw) in enumerate(weighings):
        suffix = "" if i == 0 else "2"
        rec["mean" + suffix] = round(float(w.astype(np.float64).mean()), 6) if len(w) else 0.0
        rec["ess" + suffix] = round(ess(w), 3)
        rec["lw" + suffix] = np.round(lw.astype(np.float64), 4).tolist()
    return rec


# ---- the page ------------------------------------------------------------------------------------

def script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' that could end the element or start markup."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def histogram_png(stats: VariantStats, in_shards: str, title: str) -> str:
    """`make inspect`'s histogram figure as a data: URI."""
    import matplotlib.pyplot as plt

    from scorer.report import plot_log_weights

    fig = plot_log_weights({v: st for v, st in stats.stats.items() if v != "none"}, in_shards, title)
    fig.set_size_inches(2.4 * len(fig.axes), 2.5)  # beside the table, not above it
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def summary_html(stats: VariantStats, params: WeightParams, summary: dict) -> str:
    """The weight table of `make inspect` (every variant, under the page's constants), as HTML."""
    rows = weight_table({"params": params.as_dict(), "variants": stats.result()})
    head = ("<tr><th>variant</th><th>p1</th><th>p50</th><th>p99</th><th>mean</th><th>at lo</th><th>at hi</th>"
            "<th>ESS tok</th><th>ESS seq</th></tr>")
    body = "".join(
        f"<tr{' class=shown' if r.variant == params.variant else ''}><td>{html.escape(r.variant)}"
        f"{'*' if r.variant == params.variant else ''}</td><td>{r.p1:.3g}</td><td>{r.p50:.3g}</td><td>{r.p99:.3g}</td>"
        f"<td>{r.mean:.3g}</td><td>{r.log_clip_lo:.1%}</td><td>{r.log_clip_hi:.1%}</td>"
        f"<td>{r.ess_tokens_fraction:.1%}</td><td>{r.ess_sequences_fraction:.1%}</td></tr>" for r in rows)
    line = ""
    if "rows_in" in summary:
        line = (f"<p>rows in {summary['rows_in']} = written {summary['rows_written']} + rejected "
                f"{summary['rows_rejected']}; {summary.get('shards', '?')} shards, "
                f"{summary.get('response_tokens', '?')} response tokens</p>")
    return (f"{line}<table class=summary>{head}{body}</table><p class=note>* the variant the page shows; "
            "at lo/hi: share of tokens at the log-weight clip; ESS as a share of tokens and of sequences</p>")


def legend_html(scale: float) -> str:
    k = len(PALETTE)
    cells = []
    for i in range(k):
        lo, hi = -scale + 2 * scale * i / k, -scale + 2 * scale * (i + 1) / k
        cells.append(f"<span class='sw w{i}' title='log G in [{lo:.2f}, {hi:.2f})'>{(lo + hi) / 2:+.1f}</span>")
    return (f"<div class=legend aria-label='colour scale'><span>log G &lt; 0: the target is less likely than the "
            f"behavior to write what follows</span> {''.join(cells)} <span>log G &gt; 0: more likely</span>"
            f"<div class=note>{html.escape(PALETTE_NAME)}, centred at log G = 0 (weight 1), ends at ±{scale:g} "
            f"(weight {math.exp(-scale):.3g} to {math.exp(scale):.3g}); grey text: context (no loss)</div></div>")


def palette_css() -> str:
    return "".join(f".w{i}{{background:{c};color:{text_colour(c)}}}" for i, c in enumerate(PALETTE))


def render(data: dict, summary: str, legend: str, histogram: str, title: str) -> str:
    """The whole page: the template (scorer/view.html) with its `@@NAME@@` markers filled in, in one pass
    (a filled-in value is never read again for markers)."""
    fills = {"PALETTE": palette_css(), "TITLE": html.escape(title), "SUMMARY": summary, "LEGEND": legend,
             "HISTOGRAM": histogram, "DATA": script_json(data), "CONTEXT_TEXT": CONTEXT_TEXT,
             "TIP_BACKGROUND": TIP_BACKGROUND, "TIP_TEXT": TIP_TEXT, "PAGE_BACKGROUND": PAGE_BACKGROUND}
    return re.sub(r"@@([A-Z_]+)@@", lambda m: fills[m.group(1)], TEMPLATE.read_text())


# ---- the stage -----------------------------------------------------------------------------------

def load_tokenizer(spec: str, meta: dict):
    """The tokenizer named, or the shards' target model's; ConfigError unless it is the shards' own."""
    from transformers import AutoTokenizer

    from common.models import pinned, resolve_model

    named = spec or pinned(meta.get("target_model") or {})
    where = "--tokenizer" if spec else "the shards' target model"
    try:
        folder = named if Path(named).is_dir() else resolve_model(named, "tokenizer").path
        tok = AutoTokenizer.from_pretrained(folder)
    except ConfigError as e:
        hint = "" if spec else "; name a copy of its tokenizer with --tokenizer (TOKENIZER=)"
        raise ConfigError(f"{where} {named!r}: {e}{hint}") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where} {named!r} has no loadable tokenizer ({one_line(e)})") from None
    if tokenizer_sha256(tok) != meta.get("tokenizer_sha256"):
        raise ConfigError(f"{where} {named!r} is not the tokenizer the shards were made with (tokenizer_sha256 "
                          f"differs): the ids would decode to other text")
    return tok


def view(cfg: ViewConfig, given: set[str]) -> dict:
    """Write the page; returns what `report` prints (its path, rows, size, seconds)."""
    t0 = time.perf_counter()
    scores = as_path(cfg.scores)
    try:
        shards = list_shards(scores)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if not shards:
        raise ConfigError(f"no shards in {cfg.scores}")
    metas = []
    for path in shards:
        try:
            metas.append(read_meta(path))
        except NotAShard as e:
            raise ShardError(str(e)) from None
    tok_hashes = {m.get("tokenizer_sha256") for m in metas}
    if len(tok_hashes) > 1:
        raise ShardError(f"{cfg.scores}: the shards were made with {len(tok_hashes)} different tokenizers")
    stored = stored_params(scores)
    named = {k: v for k, v in dataclasses.asdict(cfg.weights).items() if k in given}
    try:
        params = WeightParams.from_dict({**stored, **named})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{e} (the constants not given are the shards' own: {stored})") from None
    second = dataclasses.replace(params, variant=cfg.compare) if cfg.compare else None
    tokenizer = load_tokenizer(cfg.tokenizer, metas[0])

    # WHERE: checked against the columns before the pass (and on an empty frame: types too)
    passthrough = [c for c in metas[0].get("passthrough_columns", []) if c not in ROW_COLUMNS]
    where = parse_where(cfg.where, [*ROW_COLUMNS, *passthrough])
    where_names = [] if where is None else sorted(set(where.meta.root_names()))
    if where is not None:
        check_where_types(where, cfg.where, shards[0], where_names)

    # one pass: the statistics of the whole corpus and the rows to show
    variants = tuple(dict.fromkeys([v for v in VARIANTS if v != "none"] + [params.variant]
                                   + ([cfg.compare] if cfg.compare else [])))
    stats = VariantStats(params, variants=variants)
    choice = choose_rows(shards, params, cfg.n, cfg.seed, tuple(cfg.ids), where, where_names, stats)

    # the chosen rows, read whole, weighed as the page shows them, decoded token by token
    by_shard: dict[int, list[int]] = {}
    for s, r, _ in choice.rows:
        by_shard.setdefault(s, []).append(r)
    read = {s: read_rows(shards[s], sorted(rs), passthrough) for s, rs in by_shard.items()}
    rows = [read[s][r] for s, r, _ in choice.rows]
    weighings = [ragged_weights([x["target"] for x in rows], [x["behavior"] for x in rows], p)
                 for p in [params] + ([second] if second else [])]
    decode = decoder(tokenizer)
    records = [row_record(row, kinds, tokenizer, decode, [(w[0][i], w[1][i]) for w in weighings], params.delta_clip)
               for i, (row, (_, _, kinds)) in enumerate(zip(rows, choice.rows))]
    scale = page_scale([lw for w in weighings for lw in w[1]])

    # the page
    summary_path = scores / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    data = {"scores": str(cfg.scores), "params": params.as_dict(), "compare": cfg.compare or None,
            "scale": scale, "palette": len(PALETTE), "n": cfg.n, "seed": cfg.seed, "where": cfg.where,
            "ids": list(cfg.ids), "corpus_rows": choice.corpus_rows, "kept_rows": choice.kept_rows,
            "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": records}
    title = f"PEAR weights, {cfg.scores}"
    page = render(data, summary_html(stats, params, summary), legend_html(scale),
                  histogram_png(stats, stored["variant"], "log G, every response token of the shards"), title)
    out = as_path(cfg.html or scores / "weights.html")
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    replace(tmp, out)
    return {"html": str(out), "rows": len(records), "corpus_rows": choice.corpus_rows, "bytes": len(page.encode()),
            "choose_seconds": round(choice.seconds, 2), "choose_cpu_seconds": round(choice.cpu_seconds, 2),
            "seconds": round(time.perf_counter() - t0, 2)}


def check_where_types(where, text: str, shard, names: list[str]) -> None:
    """Evaluate WHERE on no rows of the right column types: a type error is found before the pass."""
    import polars as pl

    schema = pq.read_schema(shard)
    empty = {"id": pl.String, "mean_weight": pl.Float64, "ess": pl.Float64, "length": pl.Int64,
             "response_tokens": pl.Int64}
    frame = pl.DataFrame({c: pl.Series(c, [], dtype=empty[c]) if c in empty else
                          pl.from_arrow(pa.array([], schema.field(c).type)).alias(c) for c in names})
    try:
        dtype = frame.select(where.alias("keep")).schema["keep"]
    except pl.exceptions.PolarsError as e:
        raise ConfigError(f"--where {text!r} cannot be evaluated on the rows: {one_line(e)}") from None
    if dtype != pl.Boolean:
        raise ConfigError(f"--where must be true or false of a row; it gives {dtype}")


def report(done: dict) -> str:
    rows = f"{done['rows']} row{'' if done['rows'] == 1 else 's'}"
    return f"page: {done['html']} ({rows} of {done['corpus_rows']}, {done['bytes'] / 1e6:.2f} MB, {done['seconds']}s)"


def main(argv=None) -> int:
    return cli(ViewConfig, argv, __doc__, view, report, errors=(ShardError, FileNotFoundError), given=True)


if __name__ == "__main__":
    sys.exit(main())
