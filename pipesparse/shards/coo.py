"""The COO output format, and :func:`read_sparse`, which turns any output shard back into tensors.

With ``--format coo`` a sparsified column ``COL`` whose rows have shape ``S`` is stored as

    COL: struct<indices: list<int32>, values: list<T>>

one entry per row: ``indices`` are the row-major flat positions (in ``0 .. prod(S) - 1``,
ascending) of the row's non-zero values, ``values`` the values there, in the column's own
value type ``T``. Every output shard's Arrow schema carries the key ``pipesparse`` in its
metadata, a JSON object ``{"format": "coo" | "dense", "columns": {COL: {"shape": S,
"dtype": T}}}``, which is what :func:`read_sparse` decodes with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipesparse.shards.columns import ColumnSpec, to_numpy

__all__ = ["METADATA_KEY", "coo_type", "decode", "encode", "output_metadata", "read_sparse"]

METADATA_KEY = b"pipesparse"


def coo_type(value_type: pa.DataType) -> pa.DataType:
    """The struct type a column of ``value_type`` numbers is stored as."""
    return pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(value_type))])


def encode(tensor: torch.Tensor, value_type: pa.DataType) -> pa.StructArray:
    """COO rows of a ``(rows, *shape)`` tensor: the non-zero entries (NaN included) of each row."""
    rows = tensor.shape[0]
    flat = tensor.detach().cpu().reshape(rows, math.prod(tensor.shape[1:]))
    keep = flat != 0
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(keep.sum(dim=1).numpy(), out=offsets[1:])
    positions = keep.nonzero()[:, 1].to(torch.int32).numpy()
    values = flat[keep].numpy().astype(value_type.to_pandas_dtype(), copy=False)
    offsets_array = pa.array(offsets)
    return pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(offsets_array, pa.array(positions, type=pa.int32())),
            pa.ListArray.from_arrays(offsets_array, pa.array(values, type=value_type)),
        ],
        fields=list(coo_type(value_type)),
    )


def decode(
    array: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``(rows, *shape)`` tensor of a COO column."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], type=array.type)
    rows, size = len(array), int(np.prod(shape, dtype=np.int64))
    indices, values = array.field("indices"), array.field("values")
    counts = np.diff(indices.offsets.to_numpy()).astype(np.int64)
    value_counts = np.diff(values.offsets.to_numpy()).astype(np.int64)
    if not np.array_equal(counts, value_counts):
        row = int(np.flatnonzero(counts != value_counts)[0])
        raise ValueError(
            f"COO row {row} has {counts[row]} indices and {value_counts[row]} values; every "
            "row needs one value per index"
        )
    row_of = np.repeat(np.arange(rows, dtype=np.int64), counts)
    within = indices.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    outside = np.flatnonzero((within < 0) | (within >= size))
    if outside.size:
        row, index = int(row_of[outside[0]]), int(within[outside[0]])
        raise ValueError(
            f"COO row {row} has index {index}, outside 0 .. {size - 1} for shape {tuple(shape)}"
        )
    positions = row_of * size + within
    flat = values.flatten().to_numpy(zero_copy_only=False)
    dense = np.zeros(rows * size, dtype=flat.dtype)  # numpy: torch cannot scatter uint64
    dense[positions] = flat
    return torch.from_numpy(dense).to(dtype).reshape(rows, *shape)


def output_metadata(
    out_format: str, specs: list[ColumnSpec], value_types: dict[str, pa.DataType]
) -> dict[bytes, bytes]:
    """The schema metadata an output shard carries (see the module docstring)."""
    columns = {
        spec.name: {"shape": list(spec.shape), "dtype": str(value_types[spec.name])}
        for spec in specs
    }
    return {METADATA_KEY: json.dumps({"format": out_format, "columns": columns}).encode()}


def _torch_dtype(arrow_type: str) -> torch.dtype:
    numpy_type = pa.type_for_alias(arrow_type).to_pandas_dtype()
    return torch.from_numpy(np.zeros(0, dtype=numpy_type)).dtype


def read_sparse(
    path: str | Path, columns: str | list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Dense tensors ``(rows, *shape)`` of the sparsified columns of an output shard.

    Works on ``--format coo`` and ``--format dense`` outputs alike; values keep the column's
    dtype. ``columns`` picks some of the sparsified columns (``"a,b"`` or a list, as
    ``preprocess`` takes them; default: all of them). Other columns are ordinary Parquet: read
    them with ``pyarrow.parquet.read_table``.
    """
    if isinstance(columns, str):
        columns = [name.strip() for name in columns.split(",") if name.strip()]
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"{path} was not written by pipesparse (no {METADATA_KEY.decode()!r} metadata)"
        )
    meta = json.loads(raw)
    known = meta["columns"]
    wanted = list(known) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ValueError(f"{path}: {unknown} are not sparsified columns; these are: {list(known)}")
    table = pq.read_table(path, columns=wanted)
    out = {}
    for name in wanted:
        shape, dtype = tuple(known[name]["shape"]), _torch_dtype(known[name]["dtype"])
        if meta["format"] == "coo":
            try:
                out[name] = decode(table.column(name), shape, dtype)
            except ValueError as err:
                raise ValueError(f"{path}, column {name!r}: {err}") from None
        else:
            spec = ColumnSpec(name, shape, str(path))
            values = to_numpy(table.column(name), spec, str(path), 0)  # integers stay exact
            out[name] = torch.from_numpy(np.require(values, requirements="W")).to(dtype)
    return out
