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
import reprlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipesparse.shards.columns import ColumnSpec, list_levels, to_numpy
from pipesparse.shards.errors import ShardError
from pipesparse.shards.schema import split_columns

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


def _torch_dtype(arrow_type: object) -> torch.dtype | None:
    """The tensor dtype of a numeric Arrow type's name (``"float"``, ``"int64"`` ...), else None."""
    try:
        parsed = pa.type_for_alias(arrow_type)  # a non-str raises AttributeError or TypeError
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not (pa.types.is_integer(parsed) or pa.types.is_floating(parsed)):
        return None
    return torch.from_numpy(np.zeros(0, dtype=parsed.to_pandas_dtype())).dtype


def _is_coo(arrow_type: pa.DataType) -> bool:
    if not pa.types.is_struct(arrow_type):
        return False
    names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
    if "indices" not in names or "values" not in names:
        return False
    indices, values = arrow_type.field("indices").type, arrow_type.field("values").type
    return (
        pa.types.is_list(indices)
        and pa.types.is_integer(indices.value_type)
        and pa.types.is_list(values)
        and (pa.types.is_integer(values.value_type) or pa.types.is_floating(values.value_type))
    )


def _read_metadata(
    path: str, schema: pa.Schema
) -> tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The format of an output shard and the ``(shape, dtype)`` of each sparsified column, from
    its schema metadata; ShardError naming the file and what is wrong when it is not one
    pipesparse wrote."""
    key = METADATA_KEY.decode()
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(path, f"not written by pipesparse (no {key!r} schema metadata)")

    def broken(problem: str) -> ShardError:
        return ShardError(path, f"broken {key!r} schema metadata: {problem}")

    try:
        meta = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise broken(f"not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise broken(f"{reprlib.repr(meta)}, not a JSON object")
    for name in ("format", "columns"):
        if name not in meta:
            raise broken(f"no key {name!r}")
    out_format, recorded = meta["format"], meta["columns"]
    if out_format not in ("coo", "dense"):
        raise broken(f"format is {out_format!r}, expected 'coo' or 'dense'")
    if not isinstance(recorded, dict):
        raise broken(f"'columns' is {reprlib.repr(recorded)}, expected an object")
    columns = {}
    for name, entry in recorded.items():
        where = f"columns[{name!r}]"
        if not isinstance(entry, dict):
            raise broken(f"{where} is {reprlib.repr(entry)}, expected an object")
        for field in ("shape", "dtype"):
            if field not in entry:
                raise broken(f"{where} has no key {field!r}")
        shape, dtype = entry["shape"], _torch_dtype(entry["dtype"])
        if not (
            isinstance(shape, list)
            and shape
            and all(type(size) is int and size >= 0 for size in shape)
        ):
            raise broken(
                f"{where}['shape'] is {reprlib.repr(shape)}, expected a non-empty list of "
                "non-negative ints"
            )
        if dtype is None:
            raise broken(
                f"{where}['dtype'] is {reprlib.repr(entry['dtype'])}, expected a numeric Arrow type name "
                "such as 'float' or 'int64'"
            )
        if name not in schema.names:
            raise broken(f"column {name!r} it records is not in the file")
        field_type = schema.field(name).type
        if out_format == "coo" and not _is_coo(field_type):
            raise broken(
                f"column {name!r} has type {field_type}, not the COO struct "
                f"{coo_type(pa.float32())} (values of any numeric type)"
            )
        held = (
            field_type.field("values").type.value_type
            if out_format == "coo"
            else list_levels(field_type)[1]
        )
        if _torch_dtype(str(held)) not in (None, dtype):  # the values would be cast silently
            raise broken(
                f"{where}['dtype'] is {entry['dtype']!r}, but column {name!r} holds {held} values"
            )
        columns[name] = (tuple(shape), dtype)
    return out_format, columns


@contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """pyarrow's errors on a damaged file as a ShardError naming it (one line); a missing file
    stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ShardError(str(path), f"cannot read the file: {'; '.join(lines)}") from None


def read_sparse(
    path: str | Path, columns: str | list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Dense tensors ``(rows, *shape)`` of the sparsified columns of an output shard.

    Works on ``--format coo`` and ``--format dense`` outputs alike; values keep the column's
    dtype. ``columns`` picks some of the sparsified columns (``"a,b"`` or a list, as
    ``preprocess`` takes them; default: all of them). Other columns are ordinary Parquet: read
    them with ``pyarrow.parquet.read_table``. A file pipesparse did not write, or whose
    ``pipesparse`` metadata or sparsified columns are broken, raises a
    :class:`~pipesparse.shards.ShardError` naming the file and what is wrong.
    """
    if columns is not None:  # as preprocess reads them: "a,b" or a list, items split at ","
        columns = split_columns(columns)
    with _reading(path):
        schema = pq.read_schema(path)
    out_format, known = _read_metadata(str(path), schema)
    wanted = list(known) if columns is None else list(columns)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise ValueError(f"{path}: {unknown} are not sparsified columns; these are: {list(known)}")
    with _reading(path):
        table = pq.read_table(path, columns=wanted)
    out = {}
    for name in wanted:
        shape, dtype = known[name]
        if out_format == "coo":
            try:
                out[name] = decode(table.column(name), shape, dtype)
            except ValueError as err:
                raise ShardError(str(path), str(err), column=name) from None
        else:
            spec = ColumnSpec(name, shape, str(path))
            values = to_numpy(table.column(name), spec, str(path), 0)  # integers stay exact
            out[name] = torch.from_numpy(np.require(values, requirements="W")).to(dtype)
    return out
