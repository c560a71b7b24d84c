"""The Ray Data engine, for data that outgrows one machine.

Every shard is read on its own, with its own schema, by a small datasource (one read task per
shard, streaming ``pyarrow`` record batches of at most ``batch_rows`` rows, Parquet and
``save_to_disk`` Arrow files alike). Each record batch travels through Ray Data as one row of
Arrow IPC bytes next to its shard index and first row number, so shards whose columns differ
(order, pass-through columns, types) never meet in one Ray Data block, and no file name is
resolved as a pattern, a URL or a Hive partition (``ray.data.read_parquet`` read no rows of
``a?.parquet``, and unifies the schemas of the files it reads together). The batches are mapped
with ``map_batches`` on a pool of ``workers`` actors, each holding its own transform (frozen
masks travel inside the job). Order is preserved, and the mapped batches stream back to this
process, which writes each shard under its own name and records it in the manifest: the output
folder must be reachable from the driver only.

Uses the running Ray cluster if ``ray.init`` was called, else starts a local one for the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import pyarrow as pa

from pipesparse.shards.inputs import Shard
from pipesparse.shards.job import BatchProcessor, Job

__all__ = ["RayEngine"]

BLOCK_BYTES = 8 * 2**20  # largest Ray Data block during a run
SHARD, FIRST_ROW, IPC = "shard", "first_row", "ipc"  # the columns of a Ray Data row
PAYLOAD_SCHEMA = pa.schema([(SHARD, pa.int64()), (FIRST_ROW, pa.int64()), (IPC, pa.large_binary())])


def _to_ipc(data: pa.Table | pa.RecordBatch) -> bytes:
    """Arrow IPC stream bytes of ``data`` (schema and metadata included)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue().to_pybytes()


def _from_ipc(payload: pa.LargeBinaryScalar) -> pa.Table:
    return pa.ipc.open_stream(payload.as_buffer()).read_all()


def _payloads(shards: list[int], first_rows: list[int], tables: list[pa.Table]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(shards, pa.int64()),
            pa.array(first_rows, pa.int64()),
            pa.array([_to_ipc(t) for t in tables], pa.large_binary()),
        ],
        schema=PAYLOAD_SCHEMA,
    )


class _Sparsify:
    """The actor class of ``map_batches``: one processor per actor.

    Args:
        job: the job.
        paths: the input file of each shard index, for error messages.
    """

    def __init__(self, job: Job, paths: list[str]):
        self.processor, self.paths = BatchProcessor(job), paths

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards, first_rows = batch.column(SHARD).to_pylist(), batch.column(FIRST_ROW).to_pylist()
        tables = [
            self.processor(_from_ipc(payload), self.paths[shard], first_row)
            for shard, first_row, payload in zip(shards, first_rows, batch.column(IPC), strict=True)
        ]
        return _payloads(shards, first_rows, tables)


def _read_shard(index: int, shard: Shard, batch_rows: int) -> Iterable[pa.Table]:
    """One payload row per record batch of ``shard``."""
    first_row = 0
    for batch in shard.iter_batches(batch_rows):
        yield _payloads([index], [first_row], [batch])
        first_row += batch.num_rows


def _datasource(shards: list[Shard], batch_rows: int):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ShardDatasource(Datasource):
        """One read task per shard, in shard order; each reads its file with pyarrow."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs) -> list[ReadTask]:
            return [
                ReadTask(
                    lambda index=index, shard=shard: _read_shard(index, shard, batch_rows),
                    BlockMetadata(
                        num_rows=None, size_bytes=None, exec_stats=None, input_files=(shard.path,)
                    ),
                    schema=PAYLOAD_SCHEMA,
                )
                for index, shard in enumerate(shards)
            ]

    return ShardDatasource()


class RayEngine:
    """Sparsify shards with Ray Data ``map_batches`` on an actor pool.

    Args:
        job: the job.
        batch_rows: rows per record batch (one ``map_batches`` call each).
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
        # Small blocks: Ray Data would put many record batches in one block, which one actor of
        # the pool would then process alone, with nothing reaching this process until it is done.
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
        """CPUs per actor and per read task: one, less on a small cluster, where reads need room
        next to the pool (a pool holding every CPU would wait for its reads forever)."""
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return min(1.0, max(cpus - 1.0, cpus / 2) / self.workers)  # a whole CPU stays free

    def run(self, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        """``(index into shards, table)`` in row order; a shard without rows yields nothing."""
        if not shards:
            return
        import ray
        from ray.data import ActorPoolStrategy

        cpus = self._cpus()
        dataset = ray.data.read_datasource(_datasource(shards, self.batch_rows), num_cpus=cpus)
        mapped = dataset.map_batches(
            _Sparsify,
            fn_constructor_kwargs={"job": self.job, "paths": [s.path for s in shards]},
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=self.workers),
            num_cpus=cpus,
        )
        for table in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
            for index, payload in zip(
                table.column(SHARD).to_pylist(), table.column(IPC), strict=True
            ):
                yield index, _from_ipc(payload)
