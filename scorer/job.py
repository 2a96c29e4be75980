"""The scoring job: corpus -> tokenize -> target (and behavior) logprobs -> PEAR weights -> shards.

    python -m scorer.job --data corpus.parquet --out runs/score [--backend vllm] [--variant token]

The corpus is cut into units of `rows_per_shard` rows of one input file; each unit becomes one
shard, written atomically, so a rerun of the same command scores only the units whose shard is
missing. Units are spread over an actor pool with Ray Data: each actor loads its engines once in
`__init__` and scores whole units in `__call__`. The unit, not the row, is the Ray Data item so
that a shard is only ever written by one actor, in one piece, with the rows of its unit.
`RAY_ADDRESS` points the job at a cluster; without it a local Ray instance starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import console
from common.config import ConfigError, cli, field, setup_logging
from common.lock import locked, writable_folder
from common.models import model_record, pinned, resolve_model
from common.storage import append_json_line, as_path, replace, run_id, write_json_atomic
from common.vllm_engine import vllm_available
from scorer import __version__
from scorer.config import WeightConfig
from scorer.corpus import CONSUMED, INPUT_COLUMNS, KNOWN_ROLES, RowError, columns_problem, encode_row, row_id
from scorer.corpus import unknown_roles as count_unknown_roles
from scorer.engines import BACKENDS, make_scorer
from scorer.shards import (CORE_NAMES, META_KEY, REJECT_SCHEMA, SCHEMA_VERSION, NotAShard, ShardError, core_table,
                           list_shards, read_meta, made_on, remove_temporaries, tokenizer_sha256, write_atomic)
from scorer.sources import InputError, Source, open_source, open_sources
from scorer.stats import stats_of_shards, weight_table
from scorer.weights import WeightParams, ragged_weights

log = logging.getLogger("pear.scorer")



@dataclass
class ScoreConfig:
    """Score every response token of a corpus under the target (and behavior) policy."""

    data: str = field("", "corpus: a Parquet/JSONL/JSON file, a folder or a glob of them, a `datasets` folder "
                          "(save_to_disk), or a hub dataset id org/name[@revision]")
    data_config: str = field("", "hub dataset: the configuration name")
    data_split: str = field("", "hub dataset or DatasetDict folder: the split (hub default: train)")
    out: str = field("runs/score", "output folder for shards, summary.json and rejects/")
    target: str = field("", "target policy: a Hugging Face model folder or hub id org/name[@revision]")
    behavior: str = field("", "behavior policy (folder or hub id) for rows without behavior_logprobs; "
                              "empty or 'none': the corpus column only")
    backend: str = field("auto", "scoring backend: vllm, torch, or auto (torch: the fastest measured, "
                                 "see bench/RESULTS.md)")
    weights: WeightConfig = field(WeightConfig(),
                                  "PEAR weighting: --variant, --gamma, --block-size, --delta-clip, --log-weight-clip")
    max_len: int = field(4096, "longest prompt+response in tokens; longer rows are rejected")
    truncate: bool = field(False, "cut over-long responses to max_len instead of rejecting them")
    append_eos: bool = field(True, "end tokenized responses with the tokenizer's EOS token")
    rows_per_shard: int = field(1024, "rows of one input file per output shard (the unit of resume)")
    executor: str = field("ray", "ray (actor pool, local or RAY_ADDRESS cluster) or local (this process)")
    actors: int = field(0, "scoring actors (each holds its own engines); 0: one per GPU of the cluster, or one "
                           "per node on a cluster without GPUs (a single machine: one)")
    gpus_per_actor: float = field(-1.0, "GPUs per actor; -1: 1 where the cluster has GPUs, else 0")
    cpus_per_actor: float = field(0.5, "logical CPUs per actor (a whole CPU each can starve Ray Data on 2 cores)")
    token_budget: int = field(0, "torch backend: tokens per forward batch; 0: 65536 on GPU, 32768 on CPU")
    torch_attention: str = field("", "torch backend: padded or packed; empty: packed on GPU, padded on CPU")
    torch_compile: str = field("auto", "torch backend: torch.compile the layers: true, false or auto (on GPU)")
    dtype: str = field("", "model dtype; empty: bfloat16 on GPU, float32 on CPU")
    overwrite: bool = field(False, "delete shards made with other settings instead of refusing")

    def weight_params(self) -> WeightParams:
        return self.weights.params()

    def resolved_backend(self) -> str:
        # torch measured faster than vLLM's prompt logprobs on the CPU (tiny model) and is the only
        # backend measured on a GPU; vLLM stays one flag away
        return "torch" if self.backend == "auto" else self.backend

    @property
    def behavior_model(self) -> str | None:
        return None if self.behavior.lower() in ("", "none") else self.behavior


# ---- one unit of work -------------------------------------------------------------------------

class ShardScorer:
    """Ray Data callable class: engines are loaded once per actor, then whole units are scored."""

    def __init__(self, cfg: ScoreConfig, job_meta: dict, passthrough: bytes, run: str = ""):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.job_meta = job_meta
        self.run = run  # the run's name (storage.run_id), in each shard it writes
        self.passthrough = pa.ipc.read_schema(pa.py_buffer(passthrough))
        self.params = self.cfg.weight_params()
        # the models the driver resolved, pinned to their hub commit (this may be another node)
        self.target_path = resolve_model(pinned(job_meta["target_model"]), "target").path
        behavior = job_meta["behavior"]["model"]
        self.behavior_path = resolve_model(pinned(behavior), "behavior").path if behavior else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.target_path)
        self.vocab_size = AutoConfig.from_pretrained(self.target_path).vocab_size
        self.sources: dict[str, Source] = {}
        backend = self.cfg.resolved_backend()
        self.max_len = job_meta["max_len"]  # the config's, capped at the model's context window
        compile_ = {"auto": None, "true": True, "false": False}[self.cfg.torch_compile.lower()]
        kw = dict(max_model_len=self.max_len, dtype=self.cfg.dtype or None, token_budget=self.cfg.token_budget or None,
                  attention=self.cfg.torch_attention or None, compile=compile_)
        self._make = lambda model: make_scorer(backend, model, **kw)
        self.target = self._make(self.target_path)
        self._behavior = None  # loaded on first use: most corpora carry their behavior logprobs

    def behavior(self):
        if self._behavior is None:
            self._behavior = self._make(self.behavior_path)
        return self._behavior

    def source(self, spec: str) -> Source:
        if spec not in self.sources:
            self.sources[spec] = open_source(json.loads(spec))
        return self.sources[spec]

    def __call__(self, batch: dict) -> dict:
        results = [self.score_unit({k: batch[k][i] for k in batch}) for i in range(len(batch["shard"]))]
        return {k: [r[k] for r in results] for k in results[0]}

    def score_unit(self, unit: dict) -> dict:
        t0 = time.perf_counter()
        source, start, stop = self.source(unit["source"]), int(unit["start"]), int(unit["stop"])
        path = source.key
        rows, table, read_errors = source.read(start, stop)
        rejects = [dict(e, id=f"{path}:{e['row']}", source=str(path)) for e in read_errors]

        # tokenize and validate
        examples, keep, unknown_roles = [], [], 0
        for offset, row in enumerate(rows):
            if row is None:
                continue
            index = start + offset
            try:
                if table is None:
                    self.check_passthrough(row)
                ex = encode_row(row, index, str(path), self.tokenizer, max_len=self.max_len,
                                truncate=self.cfg.truncate, append_eos=self.cfg.append_eos,
                                vocab_size=self.vocab_size)
                if ex.behavior_logprobs is None and self.cfg.behavior_model is None:
                    raise RowError("behavior_logprobs", "is null and no behavior model was given")
            except Exception as e:  # whatever is wrong with one row rejects that row, not the job
                field, reason = ((e.field, e.reason) if isinstance(e, RowError)
                                 else ("<row>", f"{type(e).__name__}: {e}"))
                rejects.append({"id": _safe_id(row, index, str(path)), "source": str(path), "row": index,
                                "field": field, "reason": reason})
                continue
            unknown_roles += count_unknown_roles(row)
            examples.append(ex)
            keep.append(offset)

        # score: the target always; the behavior model only where the corpus has no logprobs.
        # Engines score every token after the prompt; the spans' tokens are kept.
        input_ids = [ex.input_ids for ex in examples]
        prompt_lens = [ex.prompt_len for ex in examples]
        picks = [ex.response_positions - ex.prompt_len for ex in examples]
        target_lps = [lp[k] for lp, k in zip(self.target.score(input_ids, prompt_lens), picks)]
        behavior_lps = [ex.behavior_logprobs for ex in examples]
        need = [i for i, b in enumerate(behavior_lps) if b is None]
        if need:
            scored = self.behavior().score([input_ids[i] for i in need], [prompt_lens[i] for i in need])
            for i, lp in zip(need, scored):
                behavior_lps[i] = lp[picks[i]]

        # a model that gives NaN/inf on a row rejects the row, not the shard
        good = []
        for i, ex in enumerate(examples):
            for name, lp in (("target_logprobs", target_lps[i]), ("behavior_logprobs", behavior_lps[i])):
                if not np.isfinite(lp).all():
                    rejects.append({"id": ex.id, "source": str(path), "row": ex.row, "field": name,
                                    "reason": "the model gave a non-finite logprob"})
                    break
            else:
                good.append(i)
        examples = [examples[i] for i in good]
        keep = [keep[i] for i in good]
        target_lps = [target_lps[i] for i in good]
        behavior_lps = [behavior_lps[i] for i in good]
        from_model = len(set(need) & set(good))

        weights, _ = ragged_weights(target_lps, behavior_lps, self.params)
        out = core_table([ex.id for ex in examples], [ex.input_ids for ex in examples],
                         [ex.spans for ex in examples], target_lps, behavior_lps, weights)
        out = _with_passthrough(out, rows, table, keep, self.passthrough, set(self.job_meta["json_encoded_columns"]))

        n_tokens = int(sum(len(x) for x in input_ids))
        seconds = time.perf_counter() - t0  # the unit's scoring time: read, tokenize, score, weigh
        out_dir = as_path(self.cfg.out)  # a local folder or an object-storage URI
        # rejects first: a unit counts as done only once its shard exists
        write_atomic(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), out_dir / "rejects" / "parts" / unit["shard"])
        behavior_source = ("model" if from_model == len(examples) and examples else
                           "column+model" if from_model else "column")
        meta = dict(self.job_meta, source=str(path), source_fingerprint=json.loads(unit["fingerprint"]),
                    rows=[start, stop], rows_sha256=rows_sha256(rows), unknown_roles=unknown_roles, made_on=made_on(),
                    behavior=dict(self.job_meta["behavior"], source=behavior_source, rows_from_model=from_model),
                    # the shard's own record of its making: the summary's speed is that of the shards there
                    scored_by={"run": self.run, "tokens": n_tokens, "seconds": round(seconds, 4)})
        write_atomic(out, out_dir / unit["shard"], meta)
        return {"shard": unit["shard"], "rows_in": stop - start, "rows_written": out.num_rows,
                "rows_rejected": len(rejects), "tokens": n_tokens, "unknown_roles": unknown_roles,
                "seconds": seconds}

    def check_passthrough(self, row: dict) -> None:
        """A JSON row's other columns must be the corpus's columns (taken from its first rows) and fit
        their types, or they would be lost from the shard (Parquet rows are typed)."""
        unknown = [k for k in row if k not in self.passthrough.names and k not in CONSUMED + INPUT_COLUMNS]
        if unknown:
            raise RowError(unknown[0], "is not among the corpus's columns, taken from its first rows (it would be "
                                       "dropped); give every row the same columns, or use Parquet")
        for f in self.passthrough:
            value = row.get(f.name)
            if value is None or f.name in self.job_meta["json_encoded_columns"]:
                continue
            try:
                pa.array([value], type=f.type)
                lost = _unknown_key(value, f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
                raise RowError(f.name, f"value {str(value)[:40]!r} ({type(value).__name__}) does not fit the "
                                       f"column's type {f.type}, taken from the corpus's first rows") from None
            if lost:
                raise RowError(f.name, f"key {lost!r} is not in the column's type {f.type}, taken from the "
                                       "corpus's first rows (it would be dropped); use Parquet for such a column")

    def close(self):
        self.target.close()
        if self._behavior is not None:
            self._behavior.close()


def _unknown_key(value, typ: pa.DataType) -> str | None:
    """A dict key (at any depth) that Arrow would silently drop when storing `value` as `typ`."""
    if pa.types.is_struct(typ) and isinstance(value, dict):
        names = {typ.field(i).name: typ.field(i).type for i in range(typ.num_fields)}
        for k, v in value.items():
            if k not in names:
                return str(k)
            lost = _unknown_key(v, names[k])
            if lost:
                return f"{k}.{lost}"
    elif (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and isinstance(value, list):
        for v in value:
            lost = _unknown_key(v, typ.value_type)
            if lost:
                return lost
    return None


def _safe_id(row: dict, index: int, source: str) -> str:
    try:
        return row_id(row, index, source)
    except Exception:  # an id that cannot even be derived: the row's place names it
        return f"{source}:{index}"


def _with_passthrough(out: pa.Table, rows: list, table: pa.Table | None, keep: list[int],
                      schema: pa.Schema, json_columns: set[str]) -> pa.Table:
    """Append the corpus's other columns for the kept rows. Every shard carries every column of
    the corpus with one type (null where its source lacks the column), so all shards read as one
    table. JSON columns whose first rows mix types are strings: JSON text of each value."""
    src = None
    if table is not None:
        src = table.take(pa.array(keep, pa.int64())) if keep else table.slice(0, 0)
    for f in schema:
        if src is not None and f.name in src.column_names:
            col = src.column(f.name)
            if col.type != f.type:
                col = col.cast(f.type)  # a wider type of the same kind (unified in check_inputs)
        elif src is None:
            values = [rows[i].get(f.name) for i in keep]
            if f.name in json_columns:
                values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
            col = pa.array(values, type=f.type)  # each value checked against the type already
        else:
            col = pa.nulls(len(keep), f.type)
        out = out.append_column(f.name, col)
    return out


# ---- the job ----------------------------------------------------------------------------------

def plan_units(sources: list[Source], rows_per_shard: int) -> list[dict]:
    """Units of at most `rows_per_shard` rows of one source; shard names are stable across runs."""
    units, used = [], set()
    for src in sources:
        stem = src.stem
        if stem in used:  # same file name in two folders
            k = 2
            while f"{stem}_{k}" in used:
                k += 1
            stem = f"{stem}_{k}"
        used.add(stem)
        n = src.num_rows()
        spec, fp = json.dumps(src.describe(), sort_keys=True), json.dumps(src.fingerprint(), sort_keys=True)
        for k, start in enumerate(range(0, n, rows_per_shard)):
            units.append({"source": spec, "key": src.key, "fingerprint": fp, "start": start,
                          "stop": min(n, start + rows_per_shard), "shard": f"{stem}-{k:05d}.parquet"})
    return units


def check_inputs(cfg: ScoreConfig) -> tuple[list[Source], list[dict], dict, bytes]:
    """Everything that can fail before any work starts; returns the corpus sources, their units, the
    job metadata and the pass-through columns' Arrow schema (serialized, to ship to actors). The
    corpus is checked (rows, columns) before any model or Ray instance is loaded."""
    from transformers import AutoConfig, AutoTokenizer

    if not cfg.data:
        raise ConfigError("no corpus given: --data (DATA=) names a file, folder, glob, datasets folder or hub dataset")
    if not cfg.target:
        raise ConfigError("no target model given: --target (TARGET=) names a model folder or hub id; "
                          "the target is the model to be trained")
    try:
        cfg.weight_params()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be at least 1, got {cfg.rows_per_shard}")
    if cfg.backend != "auto" and cfg.backend not in BACKENDS:
        raise ConfigError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if (cfg.torch_compile.lower() not in ("auto", "true", "false")
            or cfg.torch_attention not in ("", "padded", "packed")):
        raise ConfigError("torch_compile must be auto/true/false and torch_attention padded/packed")
    if cfg.executor not in ("ray", "local"):
        raise ConfigError(f"executor must be ray or local, got {cfg.executor!r}")
    if cfg.resolved_backend() == "vllm" and not vllm_available():
        raise ConfigError("backend vllm asked for, but vllm is not installed; use --backend torch")
    writable_folder(cfg.out)
    try:
        sources = open_sources(cfg.data, config=cfg.data_config or None, split=cfg.data_split or None,
                               exclude=as_path(cfg.out))  # never our own shards
        schemas = [src.schema() for src in sources]
    except InputError as e:
        raise ConfigError(str(e)) from None
    units = plan_units(sources, cfg.rows_per_shard)
    if not units:
        raise ConfigError(f"no rows to score in {cfg.data}: every input is empty")
    with_rows = {u["key"] for u in units}
    for src, schema in zip(sources, schemas):
        problem = columns_problem(schema.names) if src.key in with_rows else None
        if problem:
            raise ConfigError(f"{src.key} {problem}")
    if cfg.executor == "ray":
        check_ray_address()
    if cfg.behavior_model is None:
        lacking = [src.key for src, sc in zip(sources, schemas) if "behavior_logprobs" not in sc.names]
        if lacking:
            raise ConfigError(f"{lacking[0]} has no behavior_logprobs column and no behavior model was given: "
                              "name the model that wrote the data with BEHAVIOR= (--behavior, folder or hub id), "
                              "or add a behavior_logprobs column (one logprob per response token)")
    target = resolve_model(cfg.target, "target")
    try:
        window = getattr(AutoConfig.from_pretrained(target.path), "max_position_embeddings", None) or cfg.max_len
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"target model {cfg.target!r}: its config.json does not load "
                          f"({type(e).__name__}: {_first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"target model {cfg.target!r} has no loadable tokenizer ({type(e).__name__}: "
                          f"{_first_line(e)}); the scorer tokenizes with the target's own tokenizer: save it "
                          "in the model folder (tokenizer.save_pretrained)") from None
    tok_sha = tokenizer_sha256(tokenizer)
    behavior = {"model": None}
    if cfg.behavior_model is not None:
        ref = resolve_model(cfg.behavior_model, "behavior")
        try:
            btok = AutoTokenizer.from_pretrained(ref.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"behavior model {cfg.behavior_model!r} has no loadable tokenizer ({e}); "
                              "token-level ratios need the target's token ids") from None
        if btok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"behavior model {cfg.behavior_model!r} uses another tokenizer than the target "
                              f"{cfg.target!r}; token-level ratios need identical token ids")
        behavior["model"] = model_record(ref)
    merged, json_columns = passthrough_schema(sources, schemas)
    passthrough = merged.serialize().to_pybytes()
    params = cfg.weight_params()
    meta = {"schema_version": SCHEMA_VERSION, **params.as_dict(), "target_model": model_record(target),
            "behavior": behavior, "tokenizer_sha256": tok_sha, "backend": cfg.resolved_backend(),
            "version": __version__, "max_len": min(cfg.max_len, window), "truncate": cfg.truncate,
            "append_eos": cfg.append_eos, "passthrough_columns": merged.names, "json_encoded_columns": json_columns}
    return sources, units, meta, passthrough


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def passthrough_schema(sources: list[Source], schemas: list[pa.Schema]) -> tuple[pa.Schema, list[str]]:
    """The union of the sources' other columns, one type each, and the columns kept as JSON text.

    Types of one kind widen (int32 and int64, string and large_string); a column of two kinds in
    two sources is an error naming both. A JSON column whose first rows mix kinds (or hold only
    nulls) becomes a string column of JSON text, so that no row is lost over it.
    """
    fields: dict[str, tuple[pa.Field, str]] = {}
    for src, schema in zip(sources, schemas):
        for f in schema:
            if f.name in CONSUMED + tuple(CORE_NAMES):
                continue
            if f.name not in fields or pa.types.is_null(fields[f.name][0].type):
                fields[f.name] = (f, src.key)
                continue
            seen, where = fields[f.name]
            if pa.types.is_null(f.type):
                continue
            try:
                unified = pa.unify_schemas([pa.schema([seen]), pa.schema([f])], promote_options="permissive")[0]
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ConfigError(f"column {f.name!r} is {seen.type} in {where} but {f.type} in {src.key}; "
                                  "make it one type") from None
            fields[f.name] = (unified, where)
    json_columns = [name for name, (f, _) in fields.items() if pa.types.is_null(f.type)]
    merged = pa.schema([pa.field(name, pa.string()) if name in json_columns else f for name, (f, _) in fields.items()])
    return merged, json_columns


SCORE_KEYS = ("schema_version", "target_model", "tokenizer_sha256", "max_len", "truncate", "append_eos")


def _same_scores(a: dict, b: dict) -> bool:
    """Do two shards hold the same logprobs? (Weights may differ: `reweight` changes them.)"""
    return all(a.get(k) == b.get(k) for k in SCORE_KEYS) and a["behavior"].get("model") == b["behavior"].get("model")


def other_settings(shard: dict, job: dict) -> list[str]:
    """The settings a shard was made with that differ from this job's: `name shard's in the shard,
    job's here` (a model: its hub id or folder; `name (other content)` when only its files differ)."""
    def shown(value):
        if isinstance(value, dict):  # a model record
            return value.get("repo_id") or value.get("path") or "-"
        return "-" if value is None else value

    pairs = [(k, shard.get(k), job.get(k)) for k in (*WeightParams().as_dict(), *SCORE_KEYS)]
    pairs.append(("behavior", (shard.get("behavior") or {}).get("model"), job["behavior"].get("model")))
    out = []
    for name, theirs, ours in pairs:
        if theirs == ours:
            continue
        if shown(theirs) == shown(ours):
            out.append(f"{name} (other content)")
        else:
            out.append(f"{name} {shown(theirs)} in the shard, {shown(ours)} here")
    return out


def reconcile(cfg: ScoreConfig, out: Path, units: list[dict], job_meta: dict) -> list[dict]:
    """Decide, shard by shard, what a rerun keeps; returns the units to score.

    A shard is kept when it was made with these settings from the same rows: the same source and
    row range, and either the same source fingerprint (size and modification time, or the
    dataset's fingerprint) or, when that moved, the same content hash of its rows. A unit whose
    rows changed is scored again. A shard made with other settings, or not part of this corpus's
    plan (a file that shrank or went away), cannot be reconciled: it is refused by name, or
    deleted with --overwrite true.
    """
    planned = {u["shard"]: u for u in units}
    weights = list(WeightParams().as_dict())
    stale: list[dict] = []
    opened: dict[str, Source] = {}  # a source is opened once, however many of its units are checked
    for shard in list_shards(out):
        try:
            meta = read_meta(shard)
        except NotAShard as e:
            raise ConfigError(f"{e}: move it out of the output folder") from None
        except ShardError as e:
            if not cfg.overwrite:
                raise ConfigError(f"{e}; remove it, or --overwrite true to score its unit again") from None
            shard.unlink()
            continue
        unit = planned.get(shard.name)
        same_scores = _same_scores(meta, job_meta)
        problem = ("it is not part of this corpus's plan (its source changed or went away)" if unit is None else
                   f"it was made with other settings ({'; '.join(other_settings(meta, job_meta))})"
                   if not same_scores or {k: meta.get(k) for k in weights} != {k: job_meta[k] for k in weights}
                   else None)
        if problem:
            if not cfg.overwrite:
                hint = ("give its settings, `reweight` for new weights without scoring again" if unit and same_scores
                        else "use a new --out")
                raise ConfigError(f"{shard}: {problem}; {hint}, or --overwrite true to score it again")
            shard.unlink()
            continue
        same_place = (meta.get("source"), meta.get("rows")) == (unit["key"], [unit["start"], unit["stop"]])
        if same_place and json.dumps(meta.get("source_fingerprint"), sort_keys=True) == unit["fingerprint"]:
            continue
        if same_place:
            if unit["source"] not in opened:
                opened[unit["source"]] = open_source(json.loads(unit["source"]))
            if meta.get("rows_sha256") == rows_sha256(opened[unit["source"]].read(unit["start"], unit["stop"])[0]):
                continue  # the file was touched, its rows are the same
        stale.append(unit)
        shard.unlink()
    if stale:
        log.warning("%d shards were made from rows that changed since; scoring them again: %s", len(stale),
                    ", ".join(u["shard"] for u in stale[:5]) + (" ..." if len(stale) > 5 else ""))
    return [u for u in units if not (out / u["shard"]).exists()]


def rows_sha256(rows: list[dict | None]) -> str:
    """Content hash of a unit's rows as read (order and every field)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def run(cfg: ScoreConfig, progress: bool = True) -> dict:
    """Score what is missing under `cfg.out`, then write the merged rejects and summary.json (the
    shards as they are, and the speed of the runs that made them) and append this run's line to
    history.jsonl (what it scored, in what time: a rerun that scores nothing is a line of its own and
    leaves the record of the runs before it). Returns the summary, with this run's line as `this_run`.
    OUT is locked for the whole job: a second job on it is refused at once."""
    sources, units, job_meta, passthrough = check_inputs(cfg)
    out = as_path(cfg.out)
    with locked(out):
        (out / "rejects" / "parts").mkdir(parents=True, exist_ok=True)
        pending = reconcile(cfg, out, units, job_meta)
        log.info("%d units, %d already scored, %d to score (backend %s, executor %s)",
                 len(units), len(units) - len(pending), len(pending), job_meta["backend"], cfg.executor)
        name, t0 = run_id(), time.perf_counter()
        results = execute(cfg, pending, job_meta, passthrough, progress, name, t0) if pending else []
        remove_temporaries(out)  # of writers killed mid-write (a lost actor); no other writer holds OUT
        this_run = run_record(cfg, name, len(units), results, time.perf_counter() - t0, job_meta)
        append_json_line(this_run, out / "history.jsonl")
        summary = summarize(cfg, out, units, job_meta, sources)
        write_json_atomic(summary, out / "summary.json")
    return {**summary, "this_run": this_run}


def run_record(cfg: ScoreConfig, name: str, units: int, results: list[dict], wall: float, job_meta: dict) -> dict:
    """A run's line in history.jsonl. Two speeds, each named for its clock: tokens (prompt and
    response) per second of wall-clock time (engine start, Ray and writes included: the bar's
    `wall_tok_s`) and per second of scoring time (the units' own time, summed over the actors)."""
    tokens, scoring = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
    return {"run": name, "shards_scored": len(results), "shards_kept": units - len(results),
            "rows_scored": sum(r["rows_in"] for r in results), "tokens_scored": tokens,
            "wall_seconds": round(wall, 2), "scoring_seconds": round(scoring, 2),
            "wall_tokens_per_second": round(tokens / wall, 1) if results else None,
            "scoring_tokens_per_second": round(tokens / scoring, 1) if results else None,
            "backend": job_meta["backend"], "executor": cfg.executor}


def execute(cfg: ScoreConfig, units: list[dict], job_meta: dict, passthrough: bytes, progress: bool, run: str,
            started: float) -> list[dict]:
    """Score `units`; returns their results. The bar's `wall_tok_s` is tokens per second of wall-clock
    time since `started`, the clock of the run's `wall_tokens_per_second` in history.jsonl."""
    from tqdm import tqdm

    if cfg.executor == "ray":
        init_ray()  # before the bar: a cluster that cannot be reached is an error, not an empty bar
    bar = tqdm(total=len(units), desc="scoring shards", unit="shard", disable=not progress, file=console.err())
    results = []
    if cfg.executor == "local":
        scorer = ShardScorer(cfg, job_meta, passthrough, run)
        try:
            for u in units:
                results.append(scorer.score_unit(u))
                bar.update(1)
                bar.set_postfix(wall_tok_s=f"{sum(r['tokens'] for r in results) / (time.perf_counter() - started):.0f}")
        finally:
            scorer.close()
        bar.close()
        return results

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours
    gpus = cfg.gpus_per_actor
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    actors = cfg.actors or default_actors(ray.nodes(), gpus, cfg.cpus_per_actor, len(units))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(ShardScorer,
                        fn_constructor_kwargs={"cfg": cfg, "job_meta": job_meta, "passthrough": passthrough,
                                               "run": run},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cfg.cpus_per_actor, num_gpus=gpus,
                        # actors over the nodes, not packed onto the first that has room: every node
                        # scores, and a lost node takes a share of the actors, not all of them
                        scheduling_strategy="SPREAD")
    # an actor that dies (its process or its node) is restarted and its unit retried: Ray Data's
    # defaults for actor pools (max_restarts=-1, max_task_retries=-1); the shard is written atomically
    tokens = 0
    for r in ds.iter_rows():
        results.append(r)
        tokens += r["tokens"]
        bar.update(1)
        bar.set_postfix(actors=actors, wall_tok_s=f"{tokens / (time.perf_counter() - started):.0f}", last=r["shard"])
    bar.close()
    return results


def default_actors(nodes: list[dict], gpus_per_actor: float, cpus_per_actor: float, units: int) -> int:
    """Actors when --actors is not given: one per GPU where the cluster has GPUs, else one per live node
    with CPUs (each actor's torch threads use its node's cores); never more than the units to score."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", False))]
    if gpus_per_actor > 0:
        n = int(sum(r.get("GPU", 0) for r in alive) // gpus_per_actor)
    else:
        n = sum(1 for r in alive if r.get("CPU", 0) >= cpus_per_actor)
    return max(1, min(n, units))


def check_ray_address() -> None:
    """A RAY_ADDRESS (host:port or ray://host:port) that nothing answers on is refused before any
    model loads; Ray itself would keep retrying for a minute behind an empty progress bar."""
    import socket

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port); unset it for a local "
                          "Ray instance")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}); start it, fix the "
                          "address, or unset RAY_ADDRESS for a local Ray instance (--executor local: no Ray)") from None


def init_ray():
    """Local Ray instance, or the cluster at RAY_ADDRESS. Engines run in-process in each actor.

    Without RAY_ADDRESS a new local instance starts (address "local"), whatever cluster record
    `ray start` left in Ray's temporary folder: Ray would otherwise connect to that cluster, which
    may have died since. A cluster that refuses the connection (address, authentication token) is
    a ConfigError naming RAY_ADDRESS."""
    import ray

    if ray.is_initialized():
        return
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # the hub library's settings (offline mode, cache folder, token) reach the actors as they are here
    env.update({k: v for k, v in os.environ.items() if k.startswith("HF_")})
    # and object storage's credentials and endpoint (common/storage.py): asked for once, on the driver
    env.update({k: v for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))})
    kwargs = dict(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # a few more logical CPUs than cores: Ray Data's own tasks must not wait behind the actors
        kwargs.update(address="local", num_cpus=max(4, os.cpu_count() or 1))
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, Ray's AuthenticationError, a timeout, ...
        if not address:
            raise
        # a wrong token reaches Python as "Failed to connect"; the reason is in what Ray's C++ client
        # logged (to the stage's log when quiet, else on the terminal already)
        why = ("the cluster refused this machine's authentication token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
               "or ~/.ray/auth_token must hold the cluster's" if "InvalidAuthToken" in console.log_tail()
               else console.one_line(e))
        raise ConfigError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address} ({why}); fix the address "
                          "or its authentication, or unset RAY_ADDRESS for a local Ray instance") from None


def summarize(cfg: ScoreConfig, out: Path, units: list[dict], job_meta: dict, sources: list[Source]) -> dict:
    """The shards as they are: rows in = written + rejected, the merged rejects file, every variant's
    diagnostics, the speed of the runs that made them (`speed_of`), and the warnings: empty sources,
    duplicate ids, unknown chat roles (each a log line and a count)."""
    import pyarrow.parquet as pq

    parts = [p for p in (out / "rejects" / "parts" / u["shard"] for u in units) if p.exists()]
    by_field: dict[str, int] = {}
    tmp = out / "rejects" / ".rejects.parquet.tmp"
    with pq.ParquetWriter(tmp, REJECT_SCHEMA, compression="zstd") as writer:  # part by part
        for part in parts:
            t = pq.read_table(part, schema=REJECT_SCHEMA)
            writer.write_table(t)
            for f in t.column("field").to_pylist():
                by_field[str(f)] = by_field.get(str(f), 0) + 1
    replace(tmp, out / "rejects" / "rejects.parquet")
    shards = list_shards(out)
    footers = [pq.read_metadata(s) for s in shards]  # one footer read per shard: row count and `pear` metadata
    n_written = sum(f.num_rows for f in footers)
    with_units = {u["key"] for u in units}
    warnings = {"empty_sources": [src.key for src in sources if src.key not in with_units],
                **duplicate_ids(shards),
                "unknown_roles": sum(json.loads(f.metadata[META_KEY]).get("unknown_roles", 0) for f in footers)}
    variants = stats_of_shards(shards, cfg.weight_params())
    rows_in = sum(u["stop"] - u["start"] for u in units)
    summary = {
        "rows_in": rows_in,
        "rows_written": n_written,
        "rows_rejected": sum(by_field.values()),
        "rejects_by_field": dict(sorted(by_field.items())),
        "shards": len(shards),
        "response_tokens": variants["none"].get("tokens", 0),
        "speed": speed_of([json.loads(f.metadata[META_KEY]).get("scored_by") for f in footers],
                          read_history(out / "history.jsonl")),
        "params": {k: job_meta[k] for k in WeightParams().as_dict()},
        "backend": job_meta["backend"],
        "variants": variants,
        "warnings": warnings,
    }
    if warnings["empty_sources"]:
        log.warning("%d empty input(s), no rows: %s", len(warnings["empty_sources"]),
                    ", ".join(warnings["empty_sources"][:5]))
    if warnings["duplicate_ids"]:
        log.warning("%d rows repeat an earlier row's id (%d of these ids name different content: see summary.json)",
                    warnings["duplicate_ids"], warnings["conflicting_ids"])
    if warnings["unknown_roles"]:
        log.warning("%d messages have a role the common chat templates do not know (not one of %s); they went "
                    "through the template as they are", warnings["unknown_roles"], ", ".join(KNOWN_ROLES))
    if summary["rows_in"] != summary["rows_written"] + summary["rows_rejected"]:
        log.error("row accounting does not add up: %s",
                  {k: summary[k] for k in ("rows_in", "rows_written", "rows_rejected")})
    return summary


def read_history(path) -> list[dict]:
    """The lines of a history.jsonl ([] without one); a line that does not parse is skipped."""
    path = as_path(path)
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed writer
            continue
    return lines


def speed_of(records: list[dict | None], history: list[dict]) -> dict:
    """The speed of the runs that made the shards there, from each shard's `scored_by` record (None:
    a shard made before shards kept one) and those runs' lines in history.jsonl. Scoring time: the
    shards' tokens over their units' scoring seconds. Wall-clock: what those runs scored over their
    wall time, engine start and writes included. A run without a history line (killed) has no wall time."""
    timed = [r for r in records if r]
    tokens, scoring = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    made_by = {r["run"] for r in timed}
    runs = [h for h in history if h.get("run") in made_by and h.get("wall_seconds")]
    wall, wall_tokens = sum(h["wall_seconds"] for h in runs), sum(h["tokens_scored"] for h in runs)
    return {"shards_timed": len(timed), "tokens": tokens, "scoring_seconds": round(scoring, 2),
            "scoring_tokens_per_second": round(tokens / scoring, 1) if scoring else None,
            "runs": len(made_by), "wall_seconds": round(wall, 2),
            "wall_tokens_per_second": round(wall_tokens / wall, 1) if wall else None}


def duplicate_ids(shards: list[Path]) -> dict:
    """Rows whose id an earlier row already has, and the ids among them whose rows differ (other ids).

    Read shard by shard; 16 bytes per row are kept (a hash of the id and of the row's ids).
    """
    import pyarrow.parquet as pq

    h64 = lambda b: int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
    keys, contents = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for shard in shards:
        t = pq.read_table(shard, columns=["id", "input_ids"])
        keys.append(np.fromiter((h64(str(i).encode()) for i in t.column("id").to_pylist()), np.uint64))
        contents.append(np.fromiter((h64(np.asarray(x, np.int32).tobytes())
                                     for x in t.column("input_ids").to_numpy(zero_copy_only=False)), np.uint64))
    k, c = np.concatenate(keys), np.concatenate(contents)
    order = np.lexsort((c, k))
    k, c = k[order], c[order]
    repeat = k[1:] == k[:-1]
    conflicting = np.unique(k[1:][repeat & (c[1:] != c[:-1])])
    return {"duplicate_ids": int(repeat.sum()), "conflicting_ids": int(len(conflicting))}


def format_speed(speed: dict) -> str:
    """The two speeds by the names the bar and summary.json give them: tokens/s of wall-clock time
    (`wall_tok_s`, `wall_tokens_per_second`) and of scoring time (`scoring_tokens_per_second`)."""
    f = lambda x: "-" if x is None else f"{x:.0f}"
    return (f"tokens/s {f(speed['wall_tokens_per_second'])} wall-clock ({speed['wall_seconds']}s over "
            f"{speed['runs']} run{'s' * (speed['runs'] != 1)}), {f(speed['scoring_tokens_per_second'])} "
            f"of scoring time ({speed['scoring_seconds']}s)")


def format_summary(s: dict) -> str:
    """The printed summary: of a scoring run (`this_run` given) or of the shards as they are (`make inspect`)."""
    lines = [f"rows in {s['rows_in']} = written {s['rows_written']} + rejected {s['rows_rejected']}"
             + (f"  (rejects by field: {s['rejects_by_field']})" if s["rejects_by_field"] else "")]
    if "this_run" in s:
        r = s["this_run"]
        lines.append(f"this run: {r['shards_scored']} shards scored, {r['shards_kept']} kept, "
                     f"wall {r['wall_seconds']}s")
    lines.append(f"shards {s['shards']}, response tokens {s['response_tokens']}, backend {s['backend']}")
    if "speed" in s:  # summaries written before shards kept their own timing have none
        lines.append(f"the runs that scored them: {format_speed(s['speed'])}")
    if "reweighted" in s:
        r = s["reweighted"]
        lines.append(f"reweighted since: {' '.join(f'{k} {v}' for k, v in r['params'].items())} "
                     f"({r['shards']} shards, {r['seconds']}s)")
    lines += [f"{'variant':9} {'p1':>9} {'p50':>9} {'p99':>9} {'at lo':>6} {'at hi':>6} {'ESS tok':>8} {'ESS seq':>8}"]
    for r in weight_table(s):
        lines.append(f"{r.variant + ('*' if r.written else ' '):9} {r.p1:9.3g} {r.p50:9.3g} {r.p99:9.3g} "
                     f"{r.log_clip_lo:6.1%} {r.log_clip_hi:6.1%} {r.ess_tokens_fraction:8.1%} "
                     f"{r.ess_sequences_fraction:8.1%}")
    lines.append("(* the variant written to the shards; at lo/hi: share of tokens at the log-weight clip; "
                 "ESS as a share of tokens/sequences)")
    return "\n".join(lines)


def main(argv=None) -> int:
    setup_logging()
    return cli(ScoreConfig, argv, None, run, format_summary, errors=(ShardError,), log="score.log")


if __name__ == "__main__":
    sys.exit(main())
