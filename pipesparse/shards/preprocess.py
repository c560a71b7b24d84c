"""``preprocess``: input shards -> sparsified output shards, a manifest, resumable and atomic.

The run in order: find the shards and check every schema; build the job (a bad config or
state fails here); lock the output folder; compare with its manifest (resume, refuse, or
start over with ``overwrite``: :mod:`pipesparse.shards.resume`); remove temp files of a
killed run; then for every shard not
already complete (recorded *and* matching its checksum), stream the engine's output into a
temp file until it holds as many rows as the input shard, publish it with a rename, and record
it in the manifest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipesparse.shards.engines import ENGINES, make_engine
from pipesparse.shards.errors import ShardError, find_shard_error
from pipesparse.shards.inputs import Shard, discover_shards, files_sha256, input_paths
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
    inputs: str | os.PathLike | list[str],
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
        inputs: Parquet files, folders of them, or folders written by ``save_to_disk``
            (a list, or one path).
        out: output folder; ``manifest.json`` there records the job and the finished shards.
        columns: the columns to sparsify (``"a,b"`` or a list); others pass through unchanged.
        sparsifier: ``norm``, ``threshold`` or ``nm``; optional with a ``pipesparse fit`` state,
            required with other states (the rule they were made with).
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
    inputs = input_paths(inputs)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; accepted: {', '.join(ENGINES)}")
    for key, value in (("workers", workers), ("batch_rows", batch_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    started = time.perf_counter()
    folder = Path(out)
    inside = folder.resolve()
    for argument in inputs:  # output shards could overwrite it: refused, not skipped
        if Path(argument).is_file() and Path(argument).resolve().is_relative_to(inside):
            raise ValueError(
                f"input file {argument} is inside the output folder {folder}, where output "
                "shards are written; move it out or pass another --out"
            )
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
    """Write and record every pending shard. A shard is finished once the engine has given as
    many rows as the input file has (its metadata says how many): nothing is read ahead into
    the next shard, so an error there cannot cost a shard that is already complete, and an
    engine that gives too few or too many rows for a file fails instead of recording it."""
    if not pending:  # a rerun of a finished job: no engine to start (Ray takes seconds)
        return 0
    done = total_shards - len(pending)
    expected = [s.num_rows() for s in pending]
    bar = progress_bar(sum(expected), "preprocess", quiet, total_shards)
    bar.set_postfix_str(f"shards {done}/{total_shards}")
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=manifest.folder)
    rows = 0
    try:
        with bar, make_engine(engine_name, job, batch_rows, workers, scratch) as engine:
            stream = (item for item in engine.run(pending) if item[1].num_rows)
            for index, shard in enumerate(pending):
                schema = job.output_schema(shard.schema())
                with ShardWriter(manifest.folder / shard.name, schema) as writer:
                    while writer.rows < expected[index]:
                        item = _next(stream, pending[index:], job, batch_rows, engine_name)
                        if item is None or item[0] != index:
                            _check_extra(item, index, pending, manifest, engine_name)
                            break
                        table = item[1].cast(schema) if item[1].schema != schema else item[1]
                        writer.write(table)
                        bar.update(table.num_rows)
                    if writer.rows != expected[index]:
                        raise ShardError(
                            shard.path,
                            f"the {engine_name} engine gave {writer.rows} rows for this file, "
                            f"which has {expected[index]}; its output shard was not written",
                        )
                    info = writer.commit()
                manifest.record(shard.name, info)
                rows += info["rows"]
                done += 1
                bar.set_postfix_str(f"shards {done}/{total_shards}")
            last = _next(stream, pending[-1:], job, batch_rows, engine_name)  # must be None
            _check_extra(last, len(pending), pending, manifest, engine_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _next(
    stream: Iterator[tuple[int, pa.Table]],
    remaining: list[Shard],
    job: Job,
    batch_rows: int,
    engine_name: str,
) -> tuple[int, pa.Table] | None:
    """The engine's next table, or None at the end; its errors explained (see _explain), for
    ``remaining``: the shard being written and those after it."""
    try:
        return next(stream, None)
    except Exception as err:
        raise _explain(err, remaining, job, batch_rows, engine_name) from err


def _check_extra(
    item: tuple[int, pa.Table] | None,
    index: int,
    pending: list[Shard],
    manifest: Manifest,
    engine_name: str,
) -> None:
    """Fail if the engine gave rows for a shard already finished (``item`` belongs to one
    before ``index``); that shard is taken off the manifest and removed, to be redone."""
    if item is None or item[0] >= index:
        return
    shard = pending[item[0]]
    manifest.shards.pop(shard.name, None)
    manifest.save()
    (manifest.folder / shard.name).unlink(missing_ok=True)
    raise ShardError(
        shard.path,
        f"the {engine_name} engine gave more rows for this file than the "
        f"{shard.num_rows()} it has; its output shard was removed",
    )


def _explain(
    err: Exception, remaining: list[Shard], job: Job, batch_rows: int, engine_name: str
) -> ShardError:
    """The clearest error for a failed run, naming a file. Workers of Ray and ``datasets``
    neither know row numbers nor keep error types (they wrap them), so the unfinished shards
    are rescanned for the first bad row; failing that, the ShardError inside ``err``; an error
    that is not about the data (e.g. out of memory) is not rescanned for, and is reported on
    one line with the shard it stopped."""
    wrapped = find_shard_error(err)
    if wrapped is None and ShardError.__name__ not in str(err):
        return ShardError(remaining[0].path, f"the {engine_name} engine failed: {_summary(err)}")
    for shard in remaining:
        found = find_bad_row(shard, job.columns, batch_rows)
        if found is not None:
            return found
    return wrapped or ShardError(remaining[0].path, _summary(err))


def _summary(err: BaseException) -> str:
    """``Type: first line`` of the innermost error that ``err`` wraps (Ray wraps errors of its
    workers in errors whose message is a whole traceback)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip() if lines else '(no message)'}"
