"""hf_map_fn: a SparsifyTransform as the function of ``datasets.Dataset.map(fn, batched=True)``.

Works on every batch format map hands out (python lists, numpy, torch, arrow) and gives each
column back in the form it came in, so the Arrow type is kept (float32 stays float32, a
fixed-size list stays fixed-size). datasets fingerprints the function by pickling it with
dill: the function pickles as a copy of the transform taken by ``hf_map_fn`` (config, masks),
never as the per-batch state it builds while mapping, so re-running the same map hits the
cache and ``num_proc`` workers all get the same masks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipesparse.transforms import _arrow
from pipesparse.transforms._structure import BatchKeyError
from pipesparse.transforms.core import SparsifyTransform

__all__ = ["hf_map_fn"]


def hf_map_fn(transform: SparsifyTransform, columns: str | list[str]) -> SparsifyMapFn:
    """A function for ``dataset.map(fn, batched=True)`` that sparsifies ``columns``.

    The function holds a copy of ``transform`` taken now: calibrate a frozen transform first.

    Args:
        transform: an ``"every_batch"`` transform (a mask per batch, from the batch alone) or a
            fitted ``"frozen"`` one (the same mask for every batch and every ``num_proc`` worker).
            ``update=N`` is refused: each map worker would count batches on its own shard.
        columns: the column(s) to sparsify; each must hold fixed-shape rows of numbers. A
            transform with ``keys`` must name the same columns.
    """
    if not isinstance(transform, SparsifyTransform):
        raise TypeError(f"transform must be a SparsifyTransform, got {type(transform).__name__}")
    names = (
        [columns]
        if isinstance(columns, str)
        else list(columns)
        if isinstance(columns, Iterable)
        else []
    )
    if not names or not all(isinstance(c, str) for c in names):
        raise ValueError(
            f"columns={columns!r} is not accepted; pass a column name or a list of them"
        )
    if not isinstance(transform.update, str):
        raise ValueError(
            f"hf_map_fn does not take update={transform.update!r}: map workers would each count "
            "batches of their own shard; use update='every_batch' or a fitted update='frozen'"
        )
    if transform.keys is not None and set(transform.keys) != set(names):
        raise ValueError(
            f"the transform has keys={list(transform.keys)} and hf_map_fn got columns={names}: "
            "the map sparsifies the named columns; give the transform keys=None or these names"
        )
    mask_names = transform._mask_names([(c,) for c in (transform.keys or names)])
    if transform.update == "frozen" and not transform.is_fitted(mask_names):
        raise ValueError(
            f"the frozen transform has no mask for {mask_names}; calibrate first with "
            "transform(calibration_batch) or transform.load_state_dict(state), then call hf_map_fn"
        )
    snapshot = transform._without_batches()  # only what a map over any batches depends on
    if snapshot.keys is None:  # named columns are sparsified whatever their dtype
        snapshot.keys = tuple(names)
    snapshot.numpy_to_torch = False  # each column goes back in the form it came in
    return SparsifyMapFn(snapshot, tuple(names))


class SparsifyMapFn:
    """What :func:`hf_map_fn` returns; pickles (and hashes) as its transform and columns.

    Args:
        transform: the transform copy this function owns.
        columns: the columns it sparsifies.
    """

    def __init__(self, transform: SparsifyTransform, columns: tuple[str, ...]):
        self.transform = transform
        self.columns = columns
        self._working: SparsifyTransform | None = None  # per-batch state stays out of the hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.transform, self.columns))

    def __call__(self, batch: Any) -> Any:
        if self._working is None:
            self._working = copy.deepcopy(self.transform)
        if isinstance(batch, pa.Table):
            return self._map_table(batch)
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"hf_map_fn got a batch of type {type(batch).__name__}; use it with "
                "dataset.map(fn, batched=True) on the python, numpy, torch or arrow format, "
                "without input_columns (it takes the whole batch and picks its columns)"
            )
        row_value = _row_value(batch)
        if row_value is not None:
            raise TypeError(
                f"hf_map_fn got one row, not a batch ({row_value}); use it with "
                "dataset.map(fn, batched=True): one row at a time each row would be masked "
                "on its own"
            )
        values = {c: self._as_array(c, _column(batch, c)) for c in self.columns}
        if not len(next(iter(values.values()))):
            return {}
        masked = self._working(values)
        return {c: _like(batch[c], masked[c]) for c in self.columns}

    def _map_table(self, table: pa.Table) -> pa.Table:
        if not table.num_rows:
            return table
        values = {c: _arrow.to_numpy(_column(table, c), c) for c in self.columns}
        masked = self._working(values)
        for c in self.columns:
            index = table.schema.get_field_index(c)
            new = _arrow.from_numpy(masked[c], table.schema.field(c).type)
            table = table.set_column(index, table.schema.field(c), new)
        return table

    @staticmethod
    def _as_array(name: str, column: Any) -> np.ndarray | torch.Tensor:
        if isinstance(column, torch.Tensor):
            return column
        if isinstance(column, np.ndarray) and column.dtype != object:
            return column
        try:
            array = np.asarray(column)
        except ValueError:
            array = np.empty(0, dtype=object)  # ragged rows
        if array.dtype == object:
            what = (  # (rows of different shapes: no array, or one of row arrays / lists)
                "values that are not numbers (None, a string, a dict ...)"
                if any(v is None or isinstance(v, (str, bytes, Mapping)) for v in array.flat)
                else "rows of different shapes"
            )
            raise ValueError(
                f"column {name!r} has {what}; only fixed-shape rows of numbers can be "
                "sparsified as one batch"
            )
        return array

    def __repr__(self) -> str:
        return f"hf_map_fn({self.transform!r}, columns={list(self.columns)})"


def _column(batch: Any, name: str) -> Any:
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if name not in names:
        raise BatchKeyError(f"hf_map_fn: the batch has no column {name!r}; its columns are {names}")
    return batch[name]


def _row_value(batch: Mapping) -> str | None:
    """What shows that ``batch`` is one row (map without ``batched=True``), or None. The
    python format's row is a ``LazyRow``; a numpy or torch row holds scalars (0-d) for scalar
    columns. Only an already formatted (plain dict) batch is searched: a lazy one would
    format (decode) every column."""
    if type(batch).__name__ == "LazyRow":
        return "a datasets LazyRow"
    if type(batch) is dict:
        for name, value in batch.items():
            if isinstance(value, (int, float, np.generic)) or (
                isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0
            ):
                return f"column {name!r} holds a scalar"
    return None


def _like(original: Any, masked: Any) -> Any:
    """``masked`` in the container ``original`` came in (lists stay lists); a tensor column as
    numpy, from which ``datasets`` keeps a fixed-shape type (``Array2D``) that it would infer
    from a tensor as nested lists."""
    if isinstance(original, torch.Tensor):
        return masked.numpy(force=True) if isinstance(masked, torch.Tensor) else masked
    if isinstance(original, np.ndarray):
        return masked
    return masked.tolist()
