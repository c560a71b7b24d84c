"""Mask state files: what ``pipesparse fit`` writes, and the states ``--state`` accepts.

Accepted files (all read with ``torch.load(weights_only=True)``):

- a fit file (``format: "pipesparse.fit/1"``): the sparsifier's CLI name, class and config,
  the columns and their row shapes, the rows it was fitted on, and ``transform``: the
  ``SparsifyTransform.state_dict()`` of a frozen ``mask_over="features"`` transform;
- a ``SparsifyTransform.state_dict()`` saved with ``torch.save`` (``--state`` needs
  ``mask_over="features"``; :func:`describe_state` takes ``mask_over="batch"`` ones too);
- a sparsifier's ``state_dict()`` saved with ``torch.save``, its masks named after the columns
  (or as a transform names them), of shape ``S`` or ``(1, *S)`` for rows of shape ``S``.

Every form becomes the state of the transform preprocessing uses: masks named ``"batch"``
(one column) or ``"batch_<column>"`` (several), of shape ``(1, *S)``.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipesparse.base import STATE_FORMAT, data_names
from pipesparse.errors import CorruptStateError
from pipesparse.shards.columns import ColumnSpec
from pipesparse.shards.config import SPARSIFIERS
from pipesparse.shards.writer import atomic_write_bytes
from pipesparse.transforms.core import TRANSFORM_STATE_FORMAT, entry_mask_names

__all__ = [
    "FIT_FORMAT",
    "TRANSFORM_NAME",
    "describe_state",
    "file_mask_names",
    "load_state_file",
    "mask_name",
    "save_state_file",
    "transform_state_for",
]

FIT_FORMAT = "pipesparse.fit/1"
TRANSFORM_NAME = "batch"


def mask_name(column: str, columns: list[str], prefix: str = TRANSFORM_NAME) -> str:
    """The mask name of ``column`` in a transform named ``prefix`` over ``columns``."""
    return entry_mask_names(prefix, [(c,) for c in columns])[columns.index(column)]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def save_state_file(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed, in one line: its weights_only text runs to several lines of
    advice about ``weights_only=False``, which a state file never needs."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        lines = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        detail = lines[0].split(" was not an allowed global")[0].strip() if lines else ""
        return "it is not a torch.save file of tensors and plain containers" + (
            f" ({detail})" if detail else ""
        )
    if isinstance(err, EOFError):
        return "the file ends early (empty or truncated)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_state_file(path: str | Path) -> dict[str, Any]:
    """The dict in a state file; CorruptStateError (naming the file) when it is not one."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of any pickle
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"state file {path} does not exist") from None
    except Exception as err:  # unpickling errors come in many types
        raise CorruptStateError(
            f"state file {path} cannot be read as a torch state: {_load_failure(err)}"
        ) from None
    if not isinstance(state, Mapping):
        raise CorruptStateError(
            f"state file {path} holds a {type(state).__name__}, not a state dict"
        )
    return dict(state)


def _kind(state: Mapping[str, Any], path: str) -> str:
    fmt = state.get("format")
    if fmt == FIT_FORMAT:
        return "fit"
    if fmt == TRANSFORM_STATE_FORMAT:
        return "transform"
    if fmt in (STATE_FORMAT, None) and "state" in state and "data_groups" in state:
        return "sparsifier"
    if fmt == STATE_FORMAT or (fmt is None and ("state" in state or "data_groups" in state)):
        missing = " and ".join(repr(k) for k in ("state", "data_groups") if k not in state)
        raise CorruptStateError(
            f"state file {path} is a sparsifier state ({STATE_FORMAT}) without its {missing} "
            "key; a sparsifier state_dict holds both 'state' (masks) and 'data_groups' (configs)"
        )
    has = f"format {fmt!r}" if "format" in state else "no 'format' key"
    raise CorruptStateError(
        f"state file {path} has {has}; accepted: a `pipesparse fit` file ({FIT_FORMAT}), "
        f"a SparsifyTransform state ({TRANSFORM_STATE_FORMAT}) or a sparsifier state ({STATE_FORMAT})"
    )


def _expect(value: Any, kind: type | tuple[type, ...], path: str, key: str, what: str) -> Any:
    """``value``, or CorruptStateError naming the file and ``key`` when it is not a ``kind``."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptStateError(
            f"state file {path}: {key} is {type(value).__name__} {value!r:.60}, expected {what}"
        )
    return value


def _dicts(value: Any, path: str, key: str) -> Mapping[str, Any]:
    """``value`` checked to be a dict of dicts (masks, data groups)."""
    _expect(value, Mapping, path, key, "a dict")
    for name, entry in value.items():
        _expect(entry, Mapping, path, f"{key}[{name!r}]", "a dict")
    return value


def _fit_columns(state: Mapping[str, Any], path: str) -> list[str]:
    """The columns a fit file was fitted on, its header checked."""
    for key in ("sparsifier", "sparsifier_class"):
        _expect(state.get(key), str, path, key, "a string")
    if state["sparsifier"] not in SPARSIFIERS:
        raise CorruptStateError(
            f"state file {path}: sparsifier is {state['sparsifier']!r}, expected one of "
            f"{', '.join(SPARSIFIERS)}"
        )
    _expect(state.get("config"), Mapping, path, "config", "a dict")
    _expect(state.get("rows"), int, path, "rows", "an int")
    columns = _expect(state.get("columns"), Mapping, path, "columns", "a dict column -> shape")
    for name, shape in columns.items():
        _expect(name, str, path, "a column name", "a string")
        _expect(shape, (list, tuple), path, f"columns[{name!r}]", "a list of ints")
        for size in shape:
            _expect(size, int, path, f"columns[{name!r}]", "a list of ints")
    return list(columns)


def _sparsifier_state(
    state: Mapping[str, Any], path: str
) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, list[str] | None]:
    """The sparsifier state_dict inside ``state`` (its masks and data groups checked to be
    dicts), the transform's config (None for a plain sparsifier state), and the columns of a
    fit file. Any valid state passes: what a use needs of it is checked by that use."""
    kind = _kind(state, path)
    columns = _fit_columns(state, path) if kind == "fit" else None
    if kind == "sparsifier":
        sd, config, where = state, None, ""
    else:
        where = "transform." if kind == "fit" else ""
        transform = _expect(
            state.get("transform") if kind == "fit" else state, Mapping, path, "transform", "a dict"
        )
        config = _expect(transform.get("config"), Mapping, path, f"{where}config", "a dict")
        _expect(config.get("name", TRANSFORM_NAME), str, path, f"{where}config.name", "a string")
        where += "sparsifier."
        sd = _expect(transform.get("sparsifier"), Mapping, path, where[:-1], "a dict")
    _dicts(sd.get("state"), path, f"{where}state")
    _dicts(sd.get("data_groups"), path, f"{where}data_groups")
    _expect(sd.get("mask_dtypes", {}), Mapping, path, f"{where}mask_dtypes", "a dict")
    return sd, config, columns


def _prefix(config: Mapping[str, Any] | None) -> str | None:
    """The name a transform gives its masks (None for a plain sparsifier state)."""
    return None if config is None else config.get("name", TRANSFORM_NAME)


def _candidates(
    column: str, columns: list[str], prefix: str | None, fitted: list[str] | None, masks: Mapping
) -> list[str]:
    """The mask names that may hold ``column``'s mask. A fit file names its masks after the
    columns it was fitted on; a transform state after its own keys (not recorded: ``prefix``
    alone when it has one mask and one column is preprocessed: that mask belongs to no column
    in particular, so it may not serve two); a sparsifier state after the columns."""
    if fitted is not None:
        return [mask_name(column, fitted, prefix)] if column in fitted else []
    if prefix is not None:
        alone = len(masks) == 1 and len(columns) == 1
        return [*data_names([f"{prefix}_{column}"]), *([prefix] if alone else [])]
    return [column, mask_name(column, columns)]


def _dense_mask(entry: Mapping[str, Any], name: str, path: str) -> torch.Tensor:
    """The mask of a state entry, dense; CorruptStateError unless it is a tensor with data."""
    mask = entry.get("mask")
    if not isinstance(mask, torch.Tensor):
        raise CorruptStateError(f"state file {path}: mask {name!r} is not a tensor")
    if mask.is_meta:
        raise CorruptStateError(
            f"state file {path}: mask {name!r} is a meta tensor, which holds no values"
        )
    return mask.to_dense() if mask.layout != torch.strided else mask


def _find_mask(
    column: str,
    columns: list[str],
    prefix: str | None,
    fitted: list[str] | None,
    masks: Mapping,
    path: str,
) -> str:
    """The name ``column``'s mask has in the file; CorruptStateError when it has none."""
    candidates = _candidates(column, columns, prefix, fitted, masks)
    found = next((c for c in candidates if c in masks), None)
    if found is None:
        fitted_on = f" (fitted on columns {fitted})" if fitted is not None else ""
        looked = f"looked for {' or '.join(map(repr, candidates))}; " if candidates else ""
        raise CorruptStateError(
            f"state file {path}{fitted_on} has no mask for column {column!r} ({looked}"
            f"it has: {sorted(masks)})"
        )
    return found


def file_mask_names(state: Mapping[str, Any], path: str, columns: list[ColumnSpec]) -> dict:
    """``{column: the name of its mask in the file}``, for messages about the file's masks
    (:func:`transform_state_for` renames them ``"batch"`` or ``"batch_<column>"``)."""
    sd, config, fitted = _sparsifier_state(state, path)
    names = [c.name for c in columns]
    return {n: _find_mask(n, names, _prefix(config), fitted, sd["state"], path) for n in names}


def transform_state_for(state: Mapping[str, Any], path: str, columns: list[ColumnSpec]) -> dict:
    """The state of a frozen ``mask_over="features"`` transform named ``"batch"`` for ``columns``.

    Raises CorruptStateError naming the masks the file has when one is missing or misshapen,
    and the key when a part of the state has the wrong type.
    """
    sd, config, fitted = _sparsifier_state(state, path)
    if config is not None and config.get("mask_over") != "features":
        raise CorruptStateError(
            f"state file {path} holds mask_over={config.get('mask_over')!r} masks, which fit "
            "one batch shape; shards need per-feature masks (mask_over='features', as "
            "`pipesparse fit` makes)"
        )
    prefix = _prefix(config)
    masks, groups = sd["state"], sd["data_groups"]
    dtypes = sd.get("mask_dtypes", {})
    names = [c.name for c in columns]
    out_state, out_groups, out_dtypes = {}, {}, {}
    for spec in columns:
        found = _find_mask(spec.name, names, prefix, fitted, masks, path)
        mask = _dense_mask(masks[found], found, path)
        if tuple(mask.shape) not in (spec.shape, (1, *spec.shape)):
            raise CorruptStateError(
                f"state file {path}: mask {found!r} has shape {tuple(mask.shape)}; rows of column "
                f"{spec.name!r} have shape {spec.shape}, so the mask must be {spec.shape} or "
                f"{(1, *spec.shape)}"
            )
        new = mask_name(spec.name, names)
        out_state[new] = {"mask": mask.reshape(1, *spec.shape)}
        if found not in groups:
            raise CorruptStateError(
                f"state file {path}: mask {found!r} has no config in data_groups (it has "
                f"configs for: {sorted(groups)})"
            )
        out_groups[new] = dict(groups[found])
        if found in dtypes:
            out_dtypes[new] = dtypes[found]
    return {
        "format": TRANSFORM_STATE_FORMAT,
        "config": {"name": TRANSFORM_NAME, "update": "frozen", "mask_over": "features"},
        "batches_seen": 0,
        "sparsifier": {
            "format": STATE_FORMAT,
            "state": out_state,
            "data_groups": out_groups,
            "mask_dtypes": out_dtypes,
            "squashed": [],
        },
    }


def describe_state(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    """What a state holds: its kind, header fields, and per mask its shape, sparsity, config
    (and, for a fit file, the column it masks). Any valid state is described, also those
    ``--state`` refuses (a transform's ``mask_over="batch"`` masks)."""
    kind = _kind(state, path)
    sd, config, fitted = _sparsifier_state(state, path)
    column_of = {mask_name(c, fitted, _prefix(config)): c for c in fitted or []}
    masks = {}
    for name, entry in sd["state"].items():
        mask = _dense_mask(entry, name, path)
        kept = int(mask.ne(0).sum())
        masks[name] = {
            "column": column_of.get(name),
            "mask": mask,
            "shape": tuple(mask.shape),
            "kept": kept,
            "sparsity": 1 - kept / max(1, math.prod(mask.shape)),
            "config": dict(sd["data_groups"].get(name, {})),
        }
    header = {"kind": kind}
    if kind == "fit":
        for key in ("sparsifier", "sparsifier_class", "config", "columns", "rows"):
            header[key] = state.get(key)
    elif kind == "transform":
        for key in ("name", "update", "mask_over"):
            header[key] = config.get(key)
        header["batches_seen"] = state.get("batches_seen")
    return {"header": header, "masks": masks}
