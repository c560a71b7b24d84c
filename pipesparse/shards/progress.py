"""The progress bar (tqdm): rows, rows/s and shards done, shown only on an interactive stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, quiet: bool, shards: int) -> tqdm:
    """A rows bar; disabled under ``quiet`` or when stderr is not a terminal (logs, CI)."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit="rows",
        unit_scale=True,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
    )
    bar.set_postfix_str(f"shards 0/{shards}")
    return bar
