"""Checks of every input shard before anything is written, and the scan that finds a bad row.

Missing columns, non-numeric columns, fixed shapes that disagree and unreadable files are
found from the schemas up front; ragged and null rows are found while streaming (by the
engine, or by :func:`find_bad_row` when an engine's workers report an error without the row).
"""

from __future__ import annotations

import pyarrow as pa

from pipesparse.shards.columns import ColumnSpec, check_column, column_spec, to_tensor
from pipesparse.shards.errors import ShardError
from pipesparse.shards.inputs import Shard

__all__ = ["find_bad_row", "parse_columns", "resolve_columns", "split_columns"]


def split_columns(text: str | list[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``; duplicates are an error."""
    items = [text] if isinstance(text, str) else list(text)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"columns names a column twice: {names}")
    return names


def parse_columns(text: str | list[str]) -> list[str]:
    """The columns to sparsify (:func:`split_columns`): at least one."""
    names = split_columns(text)
    if not names:
        raise ValueError("no column to sparsify: pass --columns COL[,COL]")
    return names


def _first_row(shard: Shard, name: str) -> pa.Array | None:
    batch = next(iter(shard.iter_batches(1, columns=[name])), None)
    return batch.column(0) if batch is not None and batch.num_rows else None


def resolve_columns(shards: list[Shard], names: list[str]) -> list[ColumnSpec]:
    """Row shapes of the columns ``names``, checked against the schema of every shard.

    A fixed-size list type gives the shape; otherwise the first row of the first shard that
    has rows does, and every other row must match it (checked while streaming).
    """
    specs: dict[str, ColumnSpec] = {}
    for shard in shards:
        schema = shard.schema()
        for name in names:
            if check_column(shard.path, schema, name):
                spec = column_spec(shard.path, schema, name, None)
            elif name in specs:
                continue
            else:
                first = _first_row(shard, name)
                if first is None:
                    continue  # an empty shard cannot tell the shape of a variable list
                spec = column_spec(shard.path, schema, name, first)
            if name not in specs:
                specs[name] = spec
            elif spec.shape != specs[name].shape:
                raise ShardError(
                    shard.path,
                    f"rows have shape {spec.shape}, but rows in {specs[name].source} have shape "
                    f"{specs[name].shape}; every row of a column needs the same shape",
                    name,
                )
    missing = [n for n in names if n not in specs]
    if missing:
        raise ValueError(f"columns {missing} have no rows in any input shard: no row shape to use")
    return [specs[n] for n in names]


def find_bad_row(shard: Shard, specs: list[ColumnSpec], batch_rows: int) -> ShardError | None:
    """The first ragged or null row of ``shard`` as a ShardError, or None if there is none."""
    first_row = 0
    try:
        for batch in shard.iter_batches(batch_rows, columns=[s.name for s in specs]):
            for spec in specs:
                to_tensor(batch.column(spec.name), spec, shard.path, first_row)
            first_row += batch.num_rows
    except ShardError as err:
        return err
    return None
