"""``preprocess``: input shards -> sparsified output shards, a manifest, resumable and atomic.

The run in order: find the shards and check every schema; build the job (a bad config or
state fails here); lock the output folder; compare with its manifest (resume, refuse, or
start over with ``overwrite``: :mod:`pipesparse.shards.resume`); remove temp files of a
killed run; then for every shard not
already complete (recorded *and* matching its checksum), stream the engine's output into a
temp file, publish it with a rename, and record it in the manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipesparse.shards.engines import ENGINES, make_engine
from pipesparse.shards.errors import ShardError, find_shard_error
from pipesparse.shards.inputs import Shard, discover_shards, files_sha256
from pipesparse.shards.job import Job, build_job
from pipesparse.shards.manifest import Manifest
from pipesparse.shards.progress import progress_bar
from pipesparse.shards.resume import locked, prepare_folder
from pipesparse.shards.schema import find_bad_row
from pipesparse.shards.writer import SCRATCH_PREFIX, ShardWriter, remove_temp_files

__all__ = ["Summary", "preprocess"]


@dataclass
class Summary:
    """What a run did; ``str(summary)`` is the one-line report the CLI prints."""

    out: str
    shards: int
    skipped: int
    rows: int
    seconds: float
    input_bytes: int
    output_bytes: int
    out_format: str
    engine: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        saving = 1 - self.output_bytes / self.input_bytes if self.input_bytes else 0.0
        change = f"{saving:.1%} smaller" if saving >= 0 else f"{-saving:.1%} larger"
        resumed = f" ({self.skipped} already complete)" if self.skipped else ""
        return (
            f"{self.shards} shards{resumed} -> {self.out}: {self.rows} rows in {self.seconds:.2f}s "
            f"({self.rows_per_second:,.0f} rows/s, engine {self.engine}); {self.out_format} output "
            f"{_size(self.output_bytes)} vs input {_size(self.input_bytes)} ({change})"
        )


def _size(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    value, unit = count / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def preprocess(
    inputs: list[str],
    out: str | Path,
    columns: str | list[str],
    sparsifier: str | None = None,
    config: dict[str, Any] | None = None,
    state: str | None = None,
    out_format: str = "dense",
    engine: str = "local",
    workers: int = 1,
    batch_rows: int = 8192,
    overwrite: bool = False,
    quiet: bool = False,
) -> Summary:
    """Sparsify ``columns`` of every input shard into ``out`` (one output shard per input shard).

    Args:
        inputs: Parquet files, folders of them, or folders written by ``save_to_disk``.
        out: output folder; ``manifest.json`` there records the job and the finished shards.
        columns: the columns to sparsify (``"a,b"`` or a list); others pass through unchanged.
        sparsifier: ``norm``, ``threshold`` or ``nm`` (optional with a ``pipesparse fit`` state).
        config: sparsifier options (``{"sparsity_level": 0.5}``); not with ``state``.
        state: a mask state file: one frozen mask per column for every row of every shard.
            Without it every row gets its own mask, computed from that row.
        out_format: ``"dense"`` or ``"coo"`` (see :mod:`pipesparse.shards.coo`).
        engine: ``"local"``, ``"hf"`` (``datasets`` map) or ``"ray"`` (Ray Data).
        workers: processes (hf) or actors (ray); the local engine uses one process.
        batch_rows: rows per batch; bounds memory, never changes the outputs.
        overwrite: replace an output folder made by a different job instead of refusing.
        quiet: no progress bar.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; accepted: {', '.join(ENGINES)}")
    for key, value in (("workers", workers), ("batch_rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    started = time.perf_counter()
    folder = Path(out)
    inside = folder.resolve()
    shards = [  # an output folder inside an input folder is not input
        s
        for s in discover_shards(list(inputs))
        if not Path(s.path).resolve().is_relative_to(inside)
    ]
    if not shards:
        raise ValueError(f"no input shards outside the output folder {folder}")
    job = build_job(shards, columns, sparsifier, config, state, out_format)
    digests = files_sha256([s.path for s in shards])
    job_fields = {
        **job.identity(),
        "inputs": {
            s.name: {"path": s.path, "sha256": digest, "bytes": os.path.getsize(s.path)}
            for s, digest in zip(shards, digests, strict=True)
        },
    }
    with locked(folder):
        manifest = prepare_folder(folder, job_fields, shards, overwrite)
        remove_temp_files(folder)
        manifest.save()
        pending = [s for s in shards if s.name not in manifest.shards]
        rows = _run(job, pending, manifest, engine, workers, batch_rows, quiet, len(shards))
    return Summary(
        out=str(folder),
        shards=len(shards),
        skipped=len(shards) - len(pending),
        rows=rows,
        seconds=time.perf_counter() - started,
        input_bytes=sum(os.path.getsize(s.path) for s in shards),
        output_bytes=sum(info["bytes"] for info in manifest.shards.values()),
        out_format=out_format,
        engine=engine,
    )


def _run(
    job: Job,
    pending: list[Shard],
    manifest: Manifest,
    engine_name: str,
    workers: int,
    batch_rows: int,
    quiet: bool,
    total_shards: int,
) -> int:
    done = total_shards - len(pending)
    bar = progress_bar(sum(s.num_rows() for s in pending), "preprocess", quiet, total_shards)
    bar.set_postfix_str(f"shards {done}/{total_shards}")
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=manifest.folder)
    rows = 0
    try:
        with bar, make_engine(engine_name, job, batch_rows, workers, scratch) as engine:
            stream = engine.run(pending)
            ahead: tuple[int, Any] | None = None
            for index, shard in enumerate(pending):
                schema = job.output_schema(shard.schema())
                with ShardWriter(manifest.folder / shard.name, schema) as writer:
                    try:
                        while True:
                            ahead = ahead or next(stream, None)
                            if ahead is None or ahead[0] != index:
                                break
                            table = ahead[1].cast(schema) if ahead[1].schema != schema else ahead[1]
                            writer.write(table)
                            bar.update(table.num_rows)
                            ahead = None
                    except Exception as err:
                        raise _explain(err, pending[index:], job, batch_rows) from None
                    info = writer.commit()
                manifest.record(shard.name, info)
                rows += info["rows"]
                done += 1
                bar.set_postfix_str(f"shards {done}/{total_shards}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _explain(err: Exception, remaining: list[Shard], job: Job, batch_rows: int) -> Exception:
    """The clearest error for a failed run. Workers of Ray and ``datasets`` neither know row
    numbers nor keep error types (they wrap them), so the unfinished shards are rescanned for
    the first bad row; failing that, the ShardError inside ``err``, or ``err`` itself."""
    wrapped = find_shard_error(err)
    if wrapped is None and ShardError.__name__ not in str(err):
        return err  # not about the data (e.g. out of memory): no rescan
    for shard in remaining:
        found = find_bad_row(shard, job.columns, batch_rows)
        if found is not None:
            return found
    return wrapped or err
