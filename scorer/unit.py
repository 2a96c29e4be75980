"""One unit of work: the rows of one input file that become one shard.

`ShardScorer` reads a unit, tokenizes and checks each row, scores the target (and, where the corpus
has no behavior logprobs, the behavior model), weighs, and writes the shard and the unit's rejects.
It is a Ray Data callable class (engines loaded once in `__init__`, whole units in `__call__`) and
runs as it is in the driver with --executor local (scorer/execute.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.models import pinned, resolve_model
from common.storage import as_path
from scorer.config import ScoreConfig
from scorer.corpus import Example, RowError, encode_row, row_id
from scorer.corpus import unknown_roles as count_unknown_roles
from scorer.engines import make_scorer
from scorer.passthrough import check_row, with_passthrough
from scorer.resume import rows_sha256
from scorer.shards import REJECT_SCHEMA, core_table, made_on, write_atomic
from scorer.sources import Source, open_source
from scorer.weights import ragged_weights


@dataclass
class UnitRow:
    """A row of the unit that encoded: its place in the unit, and its logprobs once scored."""

    offset: int  # its place in the unit's rows (and in the source's Arrow table, for its pass-through values)
    example: Example
    target_logprobs: np.ndarray | None = None  # (T,) one per scored token, all spans in order
    behavior_logprobs: np.ndarray | None = None  # (T,)
    from_model: bool = False  # behavior logprobs from the behavior model, not the corpus

    @property
    def picks(self) -> np.ndarray:
        """The scored tokens' places in what an engine returns (every token after the prompt)."""
        return self.example.response_positions - self.example.prompt_len

    def non_finite(self) -> str | None:
        """The first column whose logprobs are not all finite, or None."""
        for name, lp in (("target_logprobs", self.target_logprobs), ("behavior_logprobs", self.behavior_logprobs)):
            if not np.isfinite(lp).all():
                return name
        return None


class ShardScorer:
    """Ray Data callable class: engines are loaded once per actor, then whole units are scored."""

    def __init__(self, cfg: ScoreConfig, job_meta: dict, passthrough: bytes, run: str = ""):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.job_meta = job_meta
        self.run = run  # the run's name (storage.run_id), in each shard it writes
        self.passthrough = pa.ipc.read_schema(pa.py_buffer(passthrough))
        self.json_columns = set(job_meta["json_encoded_columns"])
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
        """Score one unit and write its shard (and its rejects, first); returns the unit's counts."""
        t0 = time.perf_counter()
        source, start, stop = self.source(unit["source"]), int(unit["start"]), int(unit["stop"])
        path = str(source.key)
        rows, table, read_errors = source.read(start, stop)
        rejects = [dict(e, id=f"{path}:{e['row']}", source=path) for e in read_errors]

        # tokenize and validate: whatever is wrong with one row rejects that row, not the unit
        encoded: list[UnitRow] = []
        unknown_roles = 0
        for offset, row in enumerate(rows):
            if row is None:  # unreadable: among read_errors already
                continue
            index = start + offset
            try:
                example = self.encode(row, index, path, json_row=table is None)
            except Exception as e:
                field, reason = ((e.field, e.reason) if isinstance(e, RowError)
                                 else ("<row>", f"{type(e).__name__}: {e}"))
                rejects.append({"id": _safe_id(row, index, path), "source": path, "row": index,
                                "field": field, "reason": reason})
                continue
            unknown_roles += count_unknown_roles(row)
            encoded.append(UnitRow(offset, example))

        self.score_rows(encoded)

        # a model that gives NaN/inf on a row rejects the row, not the shard
        kept: list[UnitRow] = []
        for r in encoded:
            name = r.non_finite()
            if name:
                rejects.append({"id": r.example.id, "source": path, "row": r.example.row, "field": name,
                                "reason": "the model gave a non-finite logprob"})
            else:
                kept.append(r)
        from_model = sum(r.from_model for r in kept)

        target_lps, behavior_lps = [r.target_logprobs for r in kept], [r.behavior_logprobs for r in kept]
        weights, _ = ragged_weights(target_lps, behavior_lps, self.params)
        out = core_table([r.example.id for r in kept], [r.example.input_ids for r in kept],
                         [r.example.spans for r in kept], target_lps, behavior_lps, weights)
        out = with_passthrough(out, rows, table, [r.offset for r in kept], self.passthrough, self.json_columns)

        n_tokens = int(sum(len(r.example.input_ids) for r in encoded))  # every row scored, kept or not
        seconds = time.perf_counter() - t0  # the unit's scoring time: read, tokenize, score, weigh
        out_dir = as_path(self.cfg.out)  # a local folder or an object-storage URI
        # rejects first: a unit counts as done only once its shard exists
        write_atomic(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), out_dir / "rejects" / "parts" / unit["shard"])
        behavior_source = ("model" if from_model == len(kept) and kept else
                           "column+model" if from_model else "column")
        meta = dict(self.job_meta, source=path, source_fingerprint=json.loads(unit["fingerprint"]),
                    rows=[start, stop], rows_sha256=rows_sha256(rows), unknown_roles=unknown_roles, made_on=made_on(),
                    behavior=dict(self.job_meta["behavior"], source=behavior_source, rows_from_model=from_model),
                    # the shard's own record of its making: the summary's speed is that of the shards there
                    scored_by={"run": self.run, "tokens": n_tokens, "seconds": round(seconds, 4)})
        write_atomic(out, out_dir / unit["shard"], meta)
        return {"shard": unit["shard"], "rows_in": stop - start, "rows_written": out.num_rows,
                "rows_rejected": len(rejects), "tokens": n_tokens, "unknown_roles": unknown_roles,
                "seconds": seconds}

    def encode(self, row: dict, index: int, path: str, json_row: bool) -> Example:
        """The row tokenized and checked; RowError (or any exception) names what is wrong with it."""
        if json_row:  # Parquet rows are typed; a JSON row's other columns must fit the corpus's
            check_row(row, self.passthrough, self.json_columns)
        example = encode_row(row, index, path, self.tokenizer, max_len=self.max_len, truncate=self.cfg.truncate,
                             append_eos=self.cfg.append_eos, vocab_size=self.vocab_size)
        if example.behavior_logprobs is None and self.cfg.behavior_model is None:
            raise RowError("behavior_logprobs", "is null and no behavior model was given")
        return example

    def score_rows(self, rows: list[UnitRow]) -> None:
        """Fill in each row's logprobs: the target's always; the behavior model's only where the corpus
        has none. Engines score every token after the prompt; the spans' tokens are kept."""
        scored = self.target.score([r.example.input_ids for r in rows], [r.example.prompt_len for r in rows])
        for r, lp in zip(rows, scored):
            r.target_logprobs = lp[r.picks]
            r.behavior_logprobs = r.example.behavior_logprobs
        need = [r for r in rows if r.behavior_logprobs is None]
        if need:
            scored = self.behavior().score([r.example.input_ids for r in need], [r.example.prompt_len for r in need])
            for r, lp in zip(need, scored):
                r.behavior_logprobs, r.from_model = lp[r.picks], True

    def close(self):
        self.target.close()
        if self._behavior is not None:
            self._behavior.close()


def _safe_id(row: dict, index: int, source: str) -> str:
    try:
        return row_id(row, index, source)
    except Exception:  # an id that cannot even be derived: the row's place names it
        return f"{source}:{index}"
