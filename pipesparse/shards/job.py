"""A preprocessing job, and the batch function every engine runs.

Mask semantics (the same for every engine, worker count and ``--batch-rows``):

- with a state (``--state``): one frozen ``mask_over="features"`` mask per column, fitted
  before the run, multiplies every row of every shard;
- without: every row is its own matrix and gets its own mask, computed from that row alone
  (a 1-D row of ``D`` values is a ``1 x D`` matrix; a 2-D row is its own matrix). Rows never
  compete with other rows of their batch, so batch boundaries cannot change a result.

Masked values that are zero are written as ``+0.0`` (``-3.0 * 0`` would be ``-0.0``), so dense
and COO outputs decode to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipesparse.errors import CorruptStateError
from pipesparse.shards.columns import (
    ColumnSpec,
    from_tensor,
    list_levels,
    to_numpy,
    writable_tensor,
)
from pipesparse.shards.config import SPARSIFIERS, make_sparsifier, sparsifier_class
from pipesparse.shards.coo import coo_type, encode, output_metadata
from pipesparse.shards.inputs import Shard, file_sha256
from pipesparse.shards.manifest import state_dict_to_json
from pipesparse.shards.schema import parse_columns, resolve_columns
from pipesparse.shards.state import (
    FIT_FORMAT,
    TRANSFORM_NAME,
    file_mask_names,
    jsonable,
    load_state_file,
    mask_name,
    transform_state_for,
)
from pipesparse.transforms.core import SparsifyTransform

__all__ = ["FORMATS", "BatchProcessor", "Job", "build_job"]

FORMATS = ("dense", "coo")


@dataclass
class Job:
    """What to do to every shard; picklable, so engines ship it to their workers.

    Args:
        sparsifier: CLI name of the sparsifier (``norm``, ``threshold``, ``nm``).
        config: its constructor options (ignored for masks when ``state`` is given).
        columns: the sparsified columns and their row shapes.
        out_format: ``"dense"`` (same column types as the input) or ``"coo"``.
        state: a frozen transform state (see :mod:`pipesparse.shards.state`), or None for
            per-row masks.
        state_info: ``{"path", "sha256"}`` of the state file, for the manifest.
    """

    sparsifier: str
    config: dict[str, Any]
    columns: list[ColumnSpec]
    out_format: str = "dense"
    state: dict[str, Any] | None = None
    state_info: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.out_format not in FORMATS:
            raise ValueError(
                f"unknown output format {self.out_format!r}; accepted: {', '.join(FORMATS)}"
            )
        self.make_transform()  # bad config or state fails here, before anything is written
        if self.state is None:
            self._check_rows_fit_the_rule()

    @property
    def masks(self) -> str:
        return "per_row" if self.state is None else "frozen"

    def identity(self) -> dict[str, Any]:
        """The manifest's job fields that decide the outputs (inputs are added by the caller)."""
        return {
            "sparsifier": self.sparsifier,
            "sparsifier_class": sparsifier_class(self.sparsifier).__name__,
            "config": jsonable(self.config),
            "columns": {c.name: list(c.shape) for c in self.columns},
            "format": self.out_format,
            "masks": self.masks,
            "state": self.state_info,
            # the masks themselves (none for per-row masks), not only the state file's checksum
            "state_dict": state_dict_to_json(
                self.make_transform().sparsifier.state_dict(include_data=False)
            ),
        }

    def _check_rows_fit_the_rule(self) -> None:
        """Mask one zero row of every column, so a config that does not fit a row shape (an N:M
        group of ``m`` that does not divide the row width) fails before anything is written."""
        for spec in self.columns:
            row = torch.zeros(1, *spec.shape)
            try:
                self.make_transform([spec]).apply_in_place(per_row_view({spec.name: row}))
            except ValueError as err:
                raise ValueError(
                    f"--sparsifier {self.sparsifier} with --config {jsonable(self.config)} does "
                    f"not fit column {spec.name!r}, whose rows have shape {spec.shape}: {err}"
                ) from None

    def make_transform(self, columns: list[ColumnSpec] | None = None) -> SparsifyTransform:
        """The transform of the job, over ``columns`` (default: all of the job's)."""
        keys = [c.name for c in (self.columns if columns is None else columns)]
        if self.state is None:
            return SparsifyTransform(
                make_sparsifier(self.sparsifier, self.config),
                name=TRANSFORM_NAME,
                keys=keys,
                update="every_batch",
                mask_over="batch",
            )
        transform = SparsifyTransform(
            make_sparsifier(self.sparsifier, {}),
            name=TRANSFORM_NAME,
            keys=keys,
            update="frozen",
            mask_over="features",
        )
        transform.load_state_dict(self.state)
        return transform

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The output schema of a shard with input ``schema``: same columns, same order."""
        sparse = {c.name for c in self.columns}
        value_types = {name: list_levels(schema.field(name).type)[1] for name in sparse}
        fields = [
            f.with_type(coo_type(value_types[f.name]))  # keeps nullability and field metadata
            if self.out_format == "coo" and f.name in sparse
            else f
            for f in schema
        ]
        metadata = dict(schema.metadata or {})
        if self.out_format == "coo":
            metadata.pop(b"huggingface", None)  # its feature types describe the dense columns
        metadata.update(output_metadata(self.out_format, self.columns, value_types))
        return pa.schema(fields, metadata=metadata)


def per_row_view(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row masks see each 1-D row of ``D`` values as a ``1 x D`` matrix of its own (a
    ``(rows, 1, D)`` view); N-D rows are their own matrices already."""
    return {n: t.reshape(t.shape[0], 1, -1) if t.dim() == 2 else t for n, t in tensors.items()}


def _positive_zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """``-0.0 + 0.0`` is ``+0.0`` in IEEE arithmetic and ``x + 0.0`` is ``x`` bit for bit for
    every other value (NaN and subnormals included): one in-place pass, no comparison."""
    return tensor.add_(0.0)


class BatchProcessor:
    """Sparsify the columns of Arrow batches: ``processor(batch, file, first_row) -> Table``.

    Args:
        job: the job; the processor builds its own transform from it.
    """

    def __init__(self, job: Job):
        self.job = job
        self.transform = job.make_transform()

    def __call__(self, batch: pa.RecordBatch | pa.Table, file: str, first_row: int = 0) -> pa.Table:
        job = self.job
        rows = batch.num_rows
        schema = job.output_schema(batch.schema)
        values = {c.name: to_numpy(batch.column(c.name), c, file, first_row) for c in job.columns}
        tensors = {n: writable_tensor(v) for n, v in values.items()}
        if rows:
            view = per_row_view(tensors) if job.state is None else tensors
            with torch.no_grad():  # writable_tensor copies read-only Arrow data: ours to write
                masked = self.transform.apply_in_place(view)
            tensors = {
                n: _positive_zeros_(masked[n].reshape(t.shape))
                if t.is_floating_point()
                else masked[n].reshape(t.shape)
                for n, t in tensors.items()
            }
        arrays = []
        for field in batch.schema:
            if field.name not in tensors:
                arrays.append(batch.column(field.name))
            elif job.out_format == "coo":
                arrays.append(encode(tensors[field.name], list_levels(field.type)[1]))
            else:
                arrays.append(from_tensor(tensors[field.name], field.type))
        return pa.Table.from_arrays(arrays, schema=schema)


def _config_error(name: str, config: dict[str, Any]) -> str | None:
    """Why sparsifier ``name`` cannot take a mask's ``config`` (None when it can)."""
    try:
        make_sparsifier(name, {})._validate_config(config)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _check_rule_fits_state(
    sparsifier: str, groups: dict[str, Any], state: str, columns: dict[str, str]
) -> None:
    """ValueError when a state file that does not record its rule holds mask configs that
    ``--sparsifier`` cannot take: loading it would blame the state for the wrong rule.
    ``groups`` are the configs per column, ``columns`` the names of their masks in the file."""
    for column, config in groups.items():
        error = _config_error(sparsifier, dict(config))
        if error is None:
            continue
        fits = [other for other in SPARSIFIERS if _config_error(other, dict(config)) is None]
        hint = f" (its config fits: {', '.join(fits)})" if fits else ""
        raise ValueError(
            f"the config of mask {columns[column]!r} (column {column!r}) in {state} does not "
            f"fit --sparsifier {sparsifier} "
            f"({sparsifier_class(sparsifier).__name__}): {error}; pass the --sparsifier the "
            f"state was made with{hint}"
        )


def build_job(
    shards: list[Shard],
    columns: str | list[str],
    sparsifier: str | None,
    config: dict[str, Any] | None,
    state: str | None,
    out_format: str,
) -> Job:
    """The job for these shards; a bad column, config or state raises before anything runs."""
    specs = resolve_columns(shards, parse_columns(columns))
    if state is None:
        if sparsifier is None:
            raise ValueError(
                "--sparsifier is required (norm, threshold or nm) unless --state is given"
            )
        return Job(sparsifier, dict(config or {}), specs, out_format)
    if config:
        raise ValueError(
            "--config does not apply with --state: the masks were fitted already (their config "
            "is in the state file); drop --config, or drop --state for per-row masks"
        )
    raw = load_state_file(state)
    transform_state = transform_state_for(raw, state, specs)  # checks the file's types first
    fitted_with = raw.get("sparsifier") if raw.get("format") == FIT_FORMAT else None
    if sparsifier is None:
        if fitted_with is None:
            raise ValueError(
                f"--sparsifier is required with {state}, which is not a `pipesparse fit` file: "
                f"pass the rule the state was made with ({', '.join(SPARSIFIERS)})"
            )
        sparsifier = fitted_with
    elif fitted_with is not None and fitted_with != sparsifier:
        raise ValueError(f"{state} was fitted with --sparsifier {fitted_with}, not {sparsifier}")
    elif fitted_with is None:
        groups = transform_state["sparsifier"]["data_groups"]
        names = [c.name for c in specs]
        by_column = {c: groups[mask_name(c, names)] for c in names}
        _check_rule_fits_state(sparsifier, by_column, state, file_mask_names(raw, state, specs))
    recorded = (
        raw.get("config")
        if fitted_with is not None
        else transform_state["sparsifier"]["data_groups"]
    )
    info = {"path": str(state), "sha256": file_sha256(state)}
    try:  # the transform's load_state_dict checks the values: configs, mask dtypes
        return Job(sparsifier, jsonable(recorded or {}), specs, out_format, transform_state, info)
    except CorruptStateError as err:
        raise CorruptStateError(f"state file {state}: {err}") from None
