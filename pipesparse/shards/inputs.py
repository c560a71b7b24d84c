"""Input shards: Parquet files, folders of them, and ``datasets`` saved with ``save_to_disk``.

Every shard is read as a stream of Arrow record batches of at most ``batch_rows`` rows, so
memory is bounded by the batch size, not by the shard size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipesparse.shards.errors import ShardError

__all__ = ["Shard", "discover_shards", "file_sha256", "files_sha256", "handle_sha256"]

PARQUET, ARROW = "parquet", "arrow"
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as handle:
        return handle_sha256(handle)


def handle_sha256(handle: BinaryIO) -> str:
    """Hex sha256 of an open file's bytes from its position on. hashlib lets go of the GIL
    while it hashes a chunk, so a thread can hash while another works."""
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: list[str]) -> list[str]:
    """:func:`file_sha256` of each path, two files at a time (on two threads)."""
    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(file_sha256, paths))


@dataclass(frozen=True)
class Shard:
    """One input file and the name of the output shard it becomes.

    Args:
        name: output shard name, relative to the output directory (always ``.parquet``).
        path: the input file.
        kind: ``"parquet"`` or ``"arrow"`` (an Arrow IPC file or stream, as ``datasets`` writes).
    """

    name: str
    path: str
    kind: str

    def _fail(self, err: Exception) -> ShardError:
        """pyarrow's message may span lines; the error is one line (the CLI prints one)."""
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return ShardError(self.path, f"cannot read the file: {'; '.join(lines)}")

    def schema(self) -> pa.Schema:
        try:
            if self.kind == PARQUET:
                return pq.read_schema(self.path)
            with pa.memory_map(self.path) as source:
                return _open_arrow(source).schema
        except (OSError, pa.ArrowException) as err:
            raise self._fail(err) from None

    def num_rows(self) -> int:
        try:
            if self.kind == PARQUET:
                return pq.read_metadata(self.path).num_rows
            with pa.memory_map(self.path) as source:
                return _open_arrow(source).read_all().num_rows  # memory-mapped: no copy
        except (OSError, pa.ArrowException) as err:
            raise self._fail(err) from None

    def iter_batches(
        self, batch_rows: int, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_rows`` rows, in row order."""
        try:
            if self.kind == PARQUET:
                with pq.ParquetFile(self.path) as parquet:
                    batches = parquet.iter_batches(batch_size=batch_rows, columns=columns)
                    yield from _sliced(batches, batch_rows)
            else:
                with pa.memory_map(self.path) as source:
                    yield from _sliced(_arrow_batches(source, columns), batch_rows)
        except (OSError, pa.ArrowException) as err:
            raise self._fail(err) from None


def _sliced(batches: Iterator[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for start in range(0, batch.num_rows, batch_rows):
            yield batch.slice(start, batch_rows)


def _open_arrow(source: pa.MemoryMappedFile):
    """A reader of an Arrow IPC file, or of an IPC stream (what ``datasets`` writes)."""
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _arrow_batches(
    source: pa.MemoryMappedFile, columns: list[str] | None
) -> Iterator[pa.RecordBatch]:
    reader = _open_arrow(source)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    for batch in batches:
        yield batch if columns is None else batch.select(columns)


def _hf_dataset_files(folder: Path) -> list[Path] | None:
    """Arrow files of a ``Dataset.save_to_disk`` folder in order; None if it is not one."""
    state = folder / "state.json"
    if not state.is_file() or not (folder / "dataset_info.json").is_file():
        return None
    try:
        files = json.loads(state.read_text())["_data_files"]
        return [folder / entry["filename"] for entry in files]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(str(state), f"not a valid datasets state.json: {err}") from None


def _shards_of(argument: str) -> list[Shard]:
    path = Path(argument)
    if path.is_file():
        kind = ARROW if path.suffix == ".arrow" else PARQUET
        return [Shard(path.with_suffix(".parquet").name, str(path), kind)]
    if not path.is_dir():
        raise ShardError(argument, "no such file or directory")
    hf_files = _hf_dataset_files(path)
    if hf_files is not None:
        return [Shard(f.with_suffix(".parquet").name, str(f), ARROW) for f in hf_files]
    splits = path / "dataset_dict.json"
    if splits.is_file():  # DatasetDict.save_to_disk: one folder per split
        try:
            names = json.loads(splits.read_text())["splits"]
        except (ValueError, KeyError, TypeError) as err:
            raise ShardError(str(splits), f"not a valid dataset_dict.json: {err}") from None
        return [
            Shard(f"{split}/{f.with_suffix('.parquet').name}", str(f), ARROW)
            for split in names
            for f in (_hf_dataset_files(path / split) or [])
        ]
    files = sorted(
        f
        for f in path.rglob("*.parquet")
        if f.is_file() and not any(p.startswith((".", "_")) for p in f.relative_to(path).parts)
    )
    if not files:
        raise ShardError(argument, "folder holds no .parquet files and is not a saved dataset")
    return [Shard(f.relative_to(path).as_posix(), str(f), PARQUET) for f in files]


def input_paths(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list:
    """The inputs of ``fit`` and ``preprocess`` as a list: one path, or an iterable of them (a
    str is one path, never iterated letter by letter)."""
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def discover_shards(inputs: list[str]) -> list[Shard]:
    """Shards of every input, in the order given; output names must not collide."""
    if not inputs:
        raise ValueError("no input given: pass Parquet files, folders, or a saved dataset")
    shards = [shard for argument in inputs for shard in _shards_of(argument)]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(
                f"two inputs map to the same output shard {shard.name!r}: {seen[shard.name]} and "
                f"{shard.path}; give them different names or preprocess them into different dirs"
            )
        seen[shard.name] = shard.path
    return shards
