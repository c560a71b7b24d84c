"""The local engine: one process streaming pyarrow record batches, memory bounded by
``--batch-rows`` (Parquet is read with ``ParquetFile.iter_batches``)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipesparse.shards.inputs import Shard
from pipesparse.shards.job import BatchProcessor, Job

__all__ = ["LocalEngine"]


class LocalEngine:
    """Sparsify shards batch by batch in this process.

    Args:
        job: the job.
        batch_rows: rows per record batch.
    """

    def __init__(self, job: Job, batch_rows: int):
        self.job = job
        self.batch_rows = batch_rows
        self._processor: BatchProcessor | None = None

    def __enter__(self) -> LocalEngine:
        self._processor = BatchProcessor(self.job)
        return self

    def __exit__(self, *exc) -> None:
        self._processor = None

    def run(self, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        """``(index into shards, table)`` in row order."""
        for index, shard in enumerate(shards):
            first_row = 0
            for batch in shard.iter_batches(self.batch_rows):
                yield index, self._processor(batch, shard.path, first_row)
                first_row += batch.num_rows
