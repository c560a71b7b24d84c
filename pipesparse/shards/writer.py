"""Atomic writes: every output file is written to a temp file in its own folder, flushed to disk
and renamed into place, so a run killed at any moment leaves either the old file or the new
one, never half of one. Temp files of a killed run are removed by the next run."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipesparse.shards.inputs import handle_sha256

__all__ = [
    "SCRATCH_PREFIX",
    "ShardWriter",
    "atomic_write_bytes",
    "remove_temp_files",
]

_TMP_PREFIX = ".pipesparse-"
SCRATCH_PREFIX = ".pipesparse-scratch-"  # engines' working folders (datasets cache files)


def _temp_path(final: Path) -> Path:
    return final.with_name(f"{_TMP_PREFIX}{final.name}.{os.getpid()}.tmp")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, final: Path) -> None:
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, final)
    _fsync_dir(final.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + rename)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(final)
    try:
        temp.write_bytes(data)
        _publish(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files and scratch folders a killed run left under ``folder``."""
    folder = Path(folder)
    scratch = sorted(p for p in folder.glob(f"{SCRATCH_PREFIX}*") if p.is_dir())
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)
    leftovers = sorted(folder.rglob(f"{_TMP_PREFIX}*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return scratch + leftovers


class ShardWriter:
    """One output shard: Parquet batches go to a temp file; :meth:`commit` publishes it.

    Used as a context manager, an exception before :meth:`commit` deletes the temp file.
    Default ``ParquetWriter`` options (snappy, dictionary encoding with pyarrow's fallback to
    plain, one row group per written table): sparsified values often repeat (zeros, quantized
    or pixel data), and the dictionary is what keeps such shards small.

    Args:
        path: final path of the shard.
        schema: Arrow schema (with metadata) of the shard.
    """

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = _temp_path(self.path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._temp, schema)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> dict[str, int | str]:
        """Close, publish atomically, and return ``{"rows", "bytes", "sha256"}`` of the shard.
        The bytes are hashed on a second thread while they are flushed to disk (an open file
        survives the rename)."""
        self._writer.close()
        self._writer = None
        with open(self._temp, "rb") as handle, ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(handle_sha256, handle)
            _publish(self._temp, self.path)
            sha256 = digest.result()
        return {"rows": self.rows, "bytes": self.path.stat().st_size, "sha256": sha256}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._writer is not None:
            self.abort()
