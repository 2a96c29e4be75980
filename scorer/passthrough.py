"""The corpus's other columns, carried into the shards unchanged.

Every shard carries every column of the corpus that the scorer does not consume, with one type
(null where its source lacks the column), so that all shards read as one table. The driver merges
the sources' schemas once (`passthrough_schema`); each unit checks its JSON rows against that
schema (`check_row`) and appends the kept rows' values (`with_passthrough`).
"""
from __future__ import annotations

import json

import pyarrow as pa

from common.config import ConfigError
from scorer.corpus import CONSUMED, INPUT_COLUMNS, RowError
from scorer.shards import CORE_NAMES
from scorer.sources import Source


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


def check_row(row: dict, schema: pa.Schema, json_columns: set[str]) -> None:
    """A JSON row's other columns must be the corpus's columns (taken from its first rows) and fit
    their types, or they would be lost from the shard (Parquet rows are typed). RowError otherwise."""
    unknown = [k for k in row if k not in schema.names and k not in CONSUMED + INPUT_COLUMNS]
    if unknown:
        raise RowError(unknown[0], "is not among the corpus's columns, taken from its first rows (it would be "
                                   "dropped); give every row the same columns, or use Parquet")
    for f in schema:
        value = row.get(f.name)
        if value is None or f.name in json_columns:
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


def with_passthrough(out: pa.Table, rows: list, table: pa.Table | None, keep: list[int],
                     schema: pa.Schema, json_columns: set[str]) -> pa.Table:
    """Append the corpus's other columns for the kept rows: `keep` holds their places in the unit
    (`rows`, and `table` when the source is Parquet). Values are taken from the source's Arrow table
    where there is one, so their types pass unchanged; JSON rows' values are checked by `check_row`
    already. JSON columns whose first rows mix types are strings: JSON text of each value."""
    src = None
    if table is not None:
        src = table.take(pa.array(keep, pa.int64())) if keep else table.slice(0, 0)
    for f in schema:
        if src is not None and f.name in src.column_names:
            col = src.column(f.name)
            if col.type != f.type:
                col = col.cast(f.type)  # a wider type of the same kind (unified in passthrough_schema)
        elif src is None:
            values = [rows[i].get(f.name) for i in keep]
            if f.name in json_columns:
                values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
            col = pa.array(values, type=f.type)  # each value checked against the type already
        else:
            col = pa.nulls(len(keep), f.type)
        out = out.append_column(f.name, col)
    return out
