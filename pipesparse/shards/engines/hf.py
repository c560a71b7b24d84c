"""The ``datasets`` engine: each shard becomes a ``datasets.Dataset`` and is mapped with
``num_proc=workers`` processes; the mapped rows are written by the caller, in order.

Parquet shards and Arrow IPC *files* are streamed into an Arrow stream inside a scratch folder
of the output folder (removed after the run) and memory-mapped from there, rather than read with
``Dataset.from_parquet``, which takes its argument as a glob pattern (``a[0].parquet`` would
read ``a0.parquet``), or ``Dataset.from_file``, which reads only the stream format; Arrow streams
(``save_to_disk`` shards) are memory-mapped as they are. The map's own cache
files go to the scratch folder too, never next to the input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipesparse.shards.inputs import ARROW, Shard
from pipesparse.shards.job import BatchProcessor, Job

__all__ = ["HFEngine"]


def _is_ipc_file(path: str) -> bool:
    """Whether ``path`` is in the Arrow IPC file format (it opens with ``ARROW1``), not a stream."""
    with open(path, "rb") as handle:
        return handle.read(6) == b"ARROW1"


class _MapFunction:
    """``Dataset.map`` function (arrow format, with indices): builds its processor in the worker."""

    def __init__(self, job: Job, file: str):
        self.job, self.file = job, file
        self._processor: BatchProcessor | None = None

    def __call__(self, batch: pa.Table, indices: list[int]) -> pa.Table:
        if self._processor is None:
            self._processor = BatchProcessor(self.job)
        return self._processor(batch, self.file, indices[0] if len(indices) else 0)

    def __getstate__(self) -> dict:
        return {"job": self.job, "file": self.file, "_processor": None}


class HFEngine:
    """Sparsify shards with ``datasets.Dataset.map(num_proc=workers)``.

    Args:
        job: the job.
        batch_rows: rows per map batch (and per written batch).
        workers: map processes (1: in this process).
        scratch: folder for ``datasets`` cache files.
    """

    def __init__(self, job: Job, batch_rows: int, workers: int, scratch: str):
        self.job, self.batch_rows, self.workers = job, batch_rows, workers
        self.scratch = Path(scratch)
        self._progress_was_enabled = True

    def __enter__(self) -> HFEngine:
        import datasets

        self._progress_was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # ours counts rows and shards
        return self

    def __exit__(self, *exc) -> None:
        import datasets

        if self._progress_was_enabled:
            datasets.enable_progress_bars()

    def run(self, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        """``(index into shards, table)`` in row order, one ``Dataset.map`` per shard."""
        for index, shard in enumerate(shards):
            if not shard.num_rows():
                continue  # nothing to map (and datasets cannot load an empty Parquet file)
            for table in self._outputs(shard):
                yield index, table

    def _outputs(self, shard: Shard) -> Iterator[pa.Table]:
        import datasets

        key = hashlib.sha256(shard.name.encode()).hexdigest()[:16]
        cache = self.scratch / key
        cache.mkdir(parents=True, exist_ok=True)
        if shard.kind == ARROW and not _is_ipc_file(shard.path):
            dataset = datasets.Dataset.from_file(shard.path)
        else:
            dataset = datasets.Dataset.from_file(self._arrow_copy(shard, cache / "input.arrow"))
        mapped = dataset.with_format("arrow").map(
            _MapFunction(self.job, shard.path),
            batched=True,
            batch_size=self.batch_rows,
            with_indices=True,
            num_proc=self.workers if self.workers > 1 else None,
            load_from_cache_file=False,
            cache_file_name=str(cache / "mapped.arrow"),
            new_fingerprint=key,
        )
        yield from mapped.with_format("arrow").iter(batch_size=self.batch_rows)

    def _arrow_copy(self, shard: Shard, path: Path) -> str:
        """``shard`` (Parquet) as an Arrow stream file at ``path``, written batch by batch."""
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, shard.schema()) as out:
            for batch in shard.iter_batches(self.batch_rows):
                out.write_batch(batch)
        return str(path)
