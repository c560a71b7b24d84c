"""The Ray Data engine, for data that outgrows one machine.

Shards are read with ``ray.data.read_parquet`` (consecutive Parquet shards as one dataset, with
``include_paths`` telling the rows of each shard apart; ``save_to_disk`` Arrow files through a
small datasource) and mapped with ``map_batches`` on a pool of ``workers`` actors, each holding
its own transform (frozen masks travel inside the job). Order is preserved, and the mapped
batches stream back to this process, which writes each shard under its own name and records it
in the manifest: the output folder must be reachable from the driver only.

Uses the running Ray cluster if ``ray.init`` was called, else starts a local one for the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipesparse.shards.inputs import PARQUET, Shard
from pipesparse.shards.job import BatchProcessor, Job

__all__ = ["RayEngine"]

PATH = "path"  # the column read_parquet(include_paths=True) adds
BLOCK_BYTES = 8 * 2**20  # largest Ray Data block during a run


def _runs(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """Consecutive rows of ``table`` with the same ``path``, without that column."""
    paths = table.column(PATH).combine_chunks()
    rest = table.drop_columns([PATH])
    if not len(paths):
        return
    changes = pc.not_equal(paths[1:], paths[:-1]).to_numpy(zero_copy_only=False)
    starts = [0, *(i + 1 for i, changed in enumerate(changes) if changed), len(paths)]
    for start, stop in zip(starts[:-1], starts[1:], strict=True):
        yield paths[start].as_py(), rest.slice(start, stop - start)


class _Sparsify:
    """The actor class of ``map_batches``: one processor per actor."""

    def __init__(self, job: Job, file: str | None):
        self.processor, self.file = BatchProcessor(job), file

    def __call__(self, batch: pa.Table) -> pa.Table:
        # row numbers are not known inside Ray: the caller rescans the shard on an error
        if self.file is not None:
            return self.processor(batch, self.file, 0)
        parts = []
        for path, rows in _runs(batch):
            out = self.processor(rows, path, 0)
            parts.append(out.append_column(PATH, pa.array([path] * out.num_rows, pa.string())))
        return pa.concat_tables(parts) if parts else batch


def _arrow_datasource(shard: Shard, batch_rows: int):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ArrowFileDatasource(Datasource):
        """One read task streaming an Arrow IPC file (what ``save_to_disk`` writes)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs) -> list[ReadTask]:
            def read() -> Iterable[pa.Table]:
                for batch in shard.iter_batches(batch_rows):
                    yield pa.Table.from_batches([batch])

            meta = BlockMetadata(
                num_rows=shard.num_rows(),
                size_bytes=None,
                exec_stats=None,
                input_files=(shard.path,),
            )
            return [ReadTask(read, meta, schema=shard.schema())]

    return ArrowFileDatasource()


class RayEngine:
    """Sparsify shards with Ray Data ``map_batches`` on an actor pool.

    Args:
        job: the job.
        batch_rows: rows per ``map_batches`` batch.
        workers: actors in the pool.
    """

    def __init__(self, job: Job, batch_rows: int, workers: int):
        self.job, self.batch_rows, self.workers = job, batch_rows, workers
        self._started = False
        self._log_level = logging.NOTSET
        self._saved: tuple[bool, bool, int | None] = (False, True, None)

    def __enter__(self) -> RayEngine:
        import ray
        from ray.data import DataContext

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            self._started = True
        context = DataContext.get_current()  # set for this run, restored after it
        options = context.execution_options
        self._saved = (
            options.preserve_order,
            context.enable_progress_bars,
            context.target_max_block_size,
        )
        options.preserve_order = True  # shards are written in row order
        context.enable_progress_bars = False  # ours counts rows and shards
        # Small blocks: Ray Data reads a few small shards as one block, which one actor of the
        # pool would then process alone, with nothing reaching this process until it is done.
        context.target_max_block_size = min(
            context.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES
        )
        logger = logging.getLogger("ray.data")  # its per-dataset notices, likewise
        self._log_level = logger.level
        logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray.data import DataContext

        context = DataContext.get_current()
        (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.target_max_block_size,
        ) = self._saved
        logging.getLogger("ray.data").setLevel(self._log_level)
        if self._started:
            ray.shutdown()

    def _cpus(self) -> float:
        """CPUs per actor and per read task: one, less on a small cluster, where Ray Data's file
        listing (one whole CPU) and reads need room next to the pool (a pool holding every CPU
        would wait for its reads forever)."""
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return min(1.0, max(cpus - 1.0, cpus / 2) / self.workers)  # a whole CPU stays free

    def run(self, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        """``(index into shards, table)`` in row order; a shard without rows yields nothing."""
        start = 0
        while start < len(shards):
            stop = start + 1
            if self._groupable(shards[start]):
                while stop < len(shards) and self._groupable(shards[stop]):
                    stop += 1
            yield from self._run_group(shards, start, stop)
            start = stop

    @staticmethod
    def _groupable(shard: Shard) -> bool:
        return shard.kind == PARQUET and PATH not in shard.schema().names

    def _run_group(
        self, shards: list[Shard], start: int, stop: int
    ) -> Iterator[tuple[int, pa.Table]]:
        import ray
        from ray.data import ActorPoolStrategy

        cpus = self._cpus()
        group = shards[start:stop]
        grouped = self._groupable(group[0])
        if not grouped:
            single = group[0]
            if single.kind == PARQUET:
                dataset = ray.data.read_parquet(single.path, num_cpus=cpus)
            else:
                source = _arrow_datasource(single, self.batch_rows)
                dataset = ray.data.read_datasource(source, ray_remote_args={"num_cpus": cpus})
        else:
            paths = [os.path.abspath(s.path) for s in group]
            dataset = ray.data.read_parquet(paths, include_paths=True, num_cpus=cpus)
        mapped = dataset.map_batches(
            _Sparsify,
            fn_constructor_kwargs={"job": self.job, "file": None if grouped else group[0].path},
            batch_size=self.batch_rows,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=self.workers),
            num_cpus=cpus,
        )
        index_of = {os.path.abspath(s.path): start + i for i, s in enumerate(group)}
        for table in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not table.num_rows:
                continue
            if grouped:
                for path, rows in _runs(table):
                    yield index_of[path], rows
            else:
                yield start, table
