"""Before any work: the job's settings, corpus and models checked, and the corpus cut into units.

Everything that can be refused is refused here, with one line that says why (a ConfigError, exit
code 2), before any model or Ray instance loads: the flags, the output folder, the corpus's rows
and columns, the Ray address, the behavior logprobs' origin, the models and their tokenizers.
"""
from __future__ import annotations

import json

from common.config import ConfigError
from common.lock import writable_folder
from common.models import model_record, resolve_model
from common.storage import as_path
from common.vllm_engine import vllm_available
from scorer import __version__
from scorer.config import ScoreConfig
from scorer.corpus import columns_problem
from scorer.engines import BACKENDS
from scorer.execute import check_ray_address
from scorer.passthrough import passthrough_schema
from scorer.shards import SCHEMA_VERSION, tokenizer_sha256
from scorer.sources import InputError, Source, open_sources


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
