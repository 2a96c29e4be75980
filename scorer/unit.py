"""One unit of work: the rows of one input file that become one shard.

`ShardScorer` reads a unit, tokenizes and checks each row, scores the target (and, where the corpus
has no behavior logprobs, the behavior model), weighs, and writes the shard and the unit's rejects.
It is a Ray Data callable class (engines loaded once in `__init__`, whole units in `__call__`) and
runs as it is in the driver with --executor local (scorer/execute.py).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa

from common.models import pinned, resolve_model
from common.storage import as_path
from scorer.config import ScoreConfig
from scorer.corpus import RowError, encode_row, row_id
from scorer.corpus import unknown_roles as count_unknown_roles
from scorer.engines import make_scorer
from scorer.passthrough import check_row, with_passthrough
from scorer.resume import rows_sha256
from scorer.shards import REJECT_SCHEMA, core_table, made_on, write_atomic
from scorer.sources import Source, open_source
from scorer.weights import ragged_weights


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
                    check_row(row, self.passthrough, self.json_columns)
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
        out = with_passthrough(out, rows, table, keep, self.passthrough, self.json_columns)

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

    def close(self):
        self.target.close()
        if self._behavior is not None:
            self._behavior.close()


def _safe_id(row: dict, index: int, source: str) -> str:
    try:
        return row_id(row, index, source)
    except Exception:  # an id that cannot even be derived: the row's place names it
        return f"{source}:{index}"
