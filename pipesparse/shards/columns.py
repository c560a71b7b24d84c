"""Fixed-shape list columns <-> tensors of shape ``(rows, *shape)``.

A sparsified column holds one numeric array per row: ``list<float>`` or
``fixed_size_list<float>[D]`` rows are 1-D, nested lists are 2-D (or more). Every row of the
column must have the same shape, in every shard; the shape comes from the type when it is
fixed, else from the first row. Integer columns are masked as integer tensors (as the
sparsifiers rank and compare them: exactly) and written back as integers; every column is
written back with its own Arrow type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipesparse.shards.errors import ShardError, ShardTypeError

__all__ = [
    "ColumnSpec",
    "check_column",
    "column_spec",
    "float_tensor",
    "from_tensor",
    "list_levels",
    "to_numpy",
    "to_tensor",
    "writable_tensor",
]

ACCEPTED = (
    "lists of numbers of one fixed shape per row: list<float>, fixed_size_list<float>[D], "
    "or nested lists for 2-D"
)


def list_levels(dtype: pa.DataType) -> tuple[list[pa.DataType], pa.DataType]:
    """The nested list types of ``dtype``, outermost first, and the value type inside them."""
    levels = []
    while (
        pa.types.is_list(dtype)
        or pa.types.is_large_list(dtype)
        or pa.types.is_fixed_size_list(dtype)
    ):
        levels.append(dtype)
        dtype = dtype.value_type
    return levels, dtype


@dataclass(frozen=True)
class ColumnSpec:
    """A sparsified column: its name and the shape every row has.

    Args:
        name: the column.
        shape: shape of one row, e.g. ``(64,)`` or ``(8, 8)``.
        source: the file whose first row (or type) fixed the shape, for error messages.
    """

    name: str
    shape: tuple[int, ...]
    source: str


def _check_type(
    file: str, column: str, dtype: pa.DataType
) -> tuple[list[pa.DataType], pa.DataType]:
    levels, leaf = list_levels(dtype)
    numeric = pa.types.is_floating(leaf) or pa.types.is_integer(leaf)
    if not levels or not numeric:
        raise ShardTypeError(
            file, f"has type {dtype}, which cannot be sparsified; accepted: {ACCEPTED}", column
        )
    return levels, leaf


def check_column(file: str, schema: pa.Schema, column: str) -> bool:
    """Raise if ``column`` is missing or not numeric lists; True when its shape is in its type."""
    if column not in schema.names:
        raise ShardError(file, f"no such column; the file has: {', '.join(schema.names)}", column)
    levels, _ = _check_type(file, column, schema.field(column).type)
    return all(pa.types.is_fixed_size_list(t) for t in levels)


def column_spec(
    file: str, schema: pa.Schema, column: str, first_row: pa.Array | None
) -> ColumnSpec:
    """The spec of ``column`` from a shard's schema and (for variable lists) its first row."""
    if check_column(file, schema, column):
        return ColumnSpec(
            column, tuple(t.list_size for t in list_levels(schema.field(column).type)[0]), file
        )
    if first_row is None or len(first_row) == 0:
        raise ShardError(file, "no rows to take the row shape from", column)
    value = first_row.to_pylist()[0]
    shape: list[int] = []
    for _ in list_levels(schema.field(column).type)[0]:
        if shape and shape[-1] == 0:  # an empty list holds no lists: the levels inside are 0
            shape.append(0)
            continue
        if not isinstance(value, list):
            raise ShardError(file, "row holds a null list; rows must be complete", column, 0)
        shape.append(len(value))
        value = value[0] if value else None
    return ColumnSpec(column, tuple(shape), file)


def _first(mask: pa.Array) -> int:
    return int(pc.index(mask, True).as_py())


def _reject_nulls(
    values: pa.Array, what: str, file: str, column: str, row_offset: int, per_row: int
) -> None:
    """ShardError naming the row of the first null ``what`` (a list or a value)."""
    if values.null_count:
        index = _first(values.is_null())
        raise ShardError(
            file,
            f"row holds a null {what}; rows must be complete",
            column,
            row_offset + index // per_row,
        )


def to_numpy(
    array: pa.Array | pa.ChunkedArray, spec: ColumnSpec, file: str, row_offset: int
) -> np.ndarray:
    """``(rows, *spec.shape)`` values of a batch's column, in its own dtype; ShardError names
    the first bad row."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    rows = len(array)
    levels, leaf = _check_type(file, spec.name, array.type)
    if len(levels) != len(spec.shape):
        raise ShardError(
            file,
            f"rows have {len(levels)} list levels, expected {len(spec.shape)} (shape {spec.shape} "
            f"from {spec.source})",
            spec.name,
        )
    current: pa.Array = array
    per_row = 1
    for depth, size in enumerate(spec.shape):
        _reject_nulls(current, "list", file, spec.name, row_offset, per_row)
        lengths = pc.list_value_length(current)
        bad = _first(pc.not_equal(lengths, size))
        if bad >= 0:
            raise ShardError(
                file,
                f"ragged row: a list of length {lengths[bad].as_py()} at depth {depth} where the "
                f"row shape is {spec.shape} (set by {spec.source})",
                spec.name,
                row_offset + bad // per_row,
            )
        current = current.flatten()
        per_row *= size
    _reject_nulls(current, "value", file, spec.name, row_offset, per_row)
    return current.to_numpy(zero_copy_only=False).reshape(rows, *spec.shape)


def to_tensor(
    array: pa.Array | pa.ChunkedArray, spec: ColumnSpec, file: str, row_offset: int
) -> torch.Tensor:
    """A writable tensor of a batch's column to compute masks from (see :func:`float_tensor`)."""
    return float_tensor(to_numpy(array, spec, file, row_offset))


def float_tensor(values: np.ndarray) -> torch.Tensor:
    """A writable tensor of ``values`` to sum magnitudes of: floats as they are, integers as
    float64 (whose ``abs`` cannot overflow at the most negative integer)."""
    if np.issubdtype(values.dtype, np.integer):
        values = values.astype(np.float64)
    return writable_tensor(values)


def writable_tensor(values: np.ndarray) -> torch.Tensor:
    """A writable tensor of ``values`` in their own dtype (a copy when Arrow's are read-only):
    what masks are computed from and applied to. Integers stay integers, which the sparsifiers
    rank and compare exactly (2**53 + 1 is 2**53 in float64)."""
    return torch.from_numpy(np.require(values, requirements="W"))


def from_tensor(tensor: torch.Tensor, like: pa.DataType) -> pa.Array:
    """An Arrow array of type ``like`` (the input column's type) from ``(rows, *shape)`` data."""
    levels, leaf = list_levels(like)
    values = tensor.detach().cpu().numpy()
    rows, shape = values.shape[0], values.shape[1:]
    flat = values.reshape(-1).astype(leaf.to_pandas_dtype(), copy=False)
    array: pa.Array = pa.array(flat, type=leaf)
    for depth in range(len(levels) - 1, -1, -1):
        dtype, size = levels[depth], shape[depth]
        count = rows * math.prod(shape[:depth])
        if pa.types.is_fixed_size_list(dtype):
            array = pa.FixedSizeListArray.from_arrays(array, type=dtype)
        else:
            cls = pa.LargeListArray if pa.types.is_large_list(dtype) else pa.ListArray
            index = np.int64 if pa.types.is_large_list(dtype) else np.int32
            offsets = pa.array(np.arange(count + 1, dtype=index) * size)
            array = cls.from_arrays(offsets, array, type=dtype)
    return array
