"""Fixed-shape Arrow columns to numpy and back, keeping the exact Arrow type.

A column of lists (``list``, ``large_list``, ``fixed_size_list``, or an extension type over
them such as datasets' ``Array2D``) whose rows all have the same shape becomes one
``(rows, *shape)`` array of the leaf dtype; writing it back rebuilds the same type.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LIST_TYPES = (pa.ListType, pa.LargeListType, pa.FixedSizeListType)


def to_numpy(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """``(rows, *shape)`` numpy array of a fixed-shape numeric column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    shape = [len(array)]
    while isinstance(array.type, _LIST_TYPES):
        if array.null_count:
            raise ValueError(f"column {name!r} has null rows; only complete rows can be sparsified")
        if isinstance(array.type, pa.FixedSizeListType):
            width = array.type.list_size
        else:
            lengths = array.value_lengths()
            width = pc.min(lengths).as_py() if len(array) else 0
            if len(array) and pc.max(lengths).as_py() != width:
                raise ValueError(
                    f"column {name!r} has rows of different lengths; only fixed-shape rows can "
                    "be sparsified as one batch"
                )
        shape.append(width)
        array = array.flatten()
    if array.null_count or not (
        pa.types.is_floating(array.type) or pa.types.is_integer(array.type)
    ):
        raise TypeError(
            f"column {name!r} holds {array.type}{' with nulls' if array.null_count else ''}; "
            "accepted: numbers (any nesting of fixed-length lists of them), without nulls"
        )
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def from_numpy(values: np.ndarray, like: pa.DataType) -> pa.Array:
    """An Arrow array of type ``like`` (the column's original type) holding ``values``."""
    if isinstance(like, pa.ExtensionType):
        return pa.ExtensionArray.from_storage(like, from_numpy(values, like.storage_type))
    if not isinstance(like, _LIST_TYPES):
        return pa.array(values.reshape(-1), type=like)
    rows = values.shape[0]
    inner = from_numpy(values.reshape(-1, *values.shape[2:]), like.value_type)
    if isinstance(like, pa.FixedSizeListType):
        return pa.FixedSizeListArray.from_arrays(inner, type=like)
    width = values.shape[1] if values.ndim > 1 else 0
    offsets = np.arange(rows + 1, dtype=np.int64) * width
    if isinstance(like, pa.LargeListType):
        return pa.LargeListArray.from_arrays(pa.array(offsets), inner, type=like)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner, type=like)
