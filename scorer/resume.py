"""Resume: which shards already in the output folder a rerun keeps, and which units it scores again.

A shard records the settings it was made with and the rows it was made from (source, row range,
the source's fingerprint and a content hash of the rows), so that a rerun of the same command
scores only the units whose shard is missing or whose rows changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from common.config import ConfigError
from scorer.shards import NotAShard, ShardError, list_shards, read_meta
from scorer.sources import Source, open_source
from scorer.weights import WeightParams

log = logging.getLogger("pear.scorer")

# the settings that decide the logprobs (the behavior model apart); the weights' constants are WeightParams'
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


def reconcile(out: Path, units: list[dict], job_meta: dict, overwrite: bool) -> list[dict]:
    """Decide, shard by shard, what a rerun keeps; returns the units to score.

    A shard is kept when it was made with these settings from the same rows: the same source and
    row range, and either the same source fingerprint (size and modification time, or the
    dataset's fingerprint) or, when that moved, the same content hash of its rows. A unit whose
    rows changed is scored again. A shard made with other settings, or not part of this corpus's
    plan (a file that shrank or went away), cannot be reconciled: it is refused by name, or
    deleted with `overwrite` (--overwrite true).
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
            if not overwrite:
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
            if not overwrite:
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
