"""``fit``: per-feature masks from data, streamed, written as a state file for ``--state``.

The masks are what a frozen ``mask_over="features"`` SparsifyTransform fits on the whole
data at once: the rule runs on mean ``|x|`` over every row of every shard (accumulated in
float64, batch by batch, so memory is bounded by ``batch_rows``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from pipesparse.shards.columns import to_tensor
from pipesparse.shards.config import make_sparsifier
from pipesparse.shards.inputs import Shard, discover_shards, input_paths
from pipesparse.shards.progress import progress_bar
from pipesparse.shards.schema import parse_columns, resolve_columns
from pipesparse.shards.state import (
    FIT_FORMAT,
    TRANSFORM_NAME,
    jsonable,
    mask_name,
    save_state_file,
)
from pipesparse.transforms.core import SparsifyTransform

__all__ = ["fit", "fit_report"]


def fit(
    inputs: str | os.PathLike | list[str],
    columns: str | list[str],
    out: str | Path,
    sparsifier: str = "norm",
    config: dict[str, Any] | None = None,
    batch_rows: int = 8192,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fit one mask per column on all rows of ``inputs`` and write it to ``out`` atomically.

    Args:
        inputs: Parquet files, folders of them, or folders written by ``save_to_disk``
            (a list, or one path).
        columns: the columns to fit masks for (``"a,b"`` or a list).
        out: the state file to write (``torch.save``; load with ``weights_only=True``); not
            one of the input shards (refused: it would replace that shard).
        sparsifier: ``norm``, ``threshold`` or ``nm``.
        config: sparsifier options, e.g. ``{"sparsity_level": 0.7}``.
        batch_rows: rows read at a time.
        quiet: no progress bar.

    Returns:
        The state that was written (see :mod:`pipesparse.shards.state`).
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be an int >= 1, got {batch_rows!r}")
    inputs = input_paths(inputs)
    config = dict(config or {})
    rule = make_sparsifier(sparsifier, config)  # a bad config fails before any data is read
    shards = discover_shards(inputs)
    _refuse_input_as_out(shards, out)
    specs = resolve_columns(shards, parse_columns(columns))
    transform = SparsifyTransform(
        rule,
        name=TRANSFORM_NAME,
        keys=[s.name for s in specs],
        update="frozen",
        mask_over="features",
    )
    sums = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in specs}
    rows = 0
    bar = progress_bar(sum(s.num_rows() for s in shards), "fit", quiet, len(shards))
    with bar:
        for done, shard in enumerate(shards, 1):
            first_row = 0
            for batch in shard.iter_batches(batch_rows, columns=list(sums)):
                for spec in specs:
                    values = to_tensor(batch.column(spec.name), spec, shard.path, first_row)
                    sums[spec.name] += values.abs().sum(dim=0, dtype=torch.float64)
                first_row += batch.num_rows
                bar.update(batch.num_rows)
            rows += first_row
            bar.set_postfix_str(f"shards {done}/{len(shards)}")
    if rows == 0:
        raise ValueError(f"no rows to fit masks on in {inputs}")
    transform.fit({name: (total / rows).unsqueeze(0) for name, total in sums.items()})
    state = {
        "format": FIT_FORMAT,
        "sparsifier": sparsifier,
        "sparsifier_class": type(transform.sparsifier).__name__,
        "config": jsonable(config),
        "columns": {s.name: list(s.shape) for s in specs},
        "rows": rows,
        "transform": transform.state_dict(),
    }
    save_state_file(out, state)
    return state


def _refuse_input_as_out(shards: list[Shard], out: str | Path) -> None:
    """ValueError when ``out`` is one of the input shards: the state file would replace it."""
    target = Path(out).resolve()
    for shard in shards:
        path = Path(shard.path)
        if path.resolve() == target or (target.exists() and os.path.samefile(path, target)):
            raise ValueError(
                f"input file {shard.path} is the output state file {out}, where the fitted "
                "masks are written; pass another --out"
            )


def fit_report(state: dict[str, Any], out: str | Path) -> str:
    """One line about a fitted state: columns, rows and the sparsity of each mask."""
    masks = state["transform"]["sparsifier"]["state"]
    columns = list(state["columns"])
    parts = []
    for column in columns:
        mask = masks[mask_name(column, columns)]["mask"]
        sparsity = 1 - int(mask.ne(0).sum()) / max(1, math.prod(mask.shape))
        parts.append(f"{column} {tuple(mask.shape[1:])} sparsity {sparsity:.1%}")
    return f"fitted {', '.join(parts)} on {state['rows']} rows -> {out}"
