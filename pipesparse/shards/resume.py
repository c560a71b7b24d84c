"""Whether an output folder may be resumed, refused, or started over, and its lock.

A folder with a manifest of the same job resumes: shards recorded with a matching checksum are
kept, the rest is redone. A different job (or files named like output shards that no manifest
accounts for) is refused with what changed, unless ``overwrite``.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipesparse.shards.inputs import Shard
from pipesparse.shards.manifest import MANIFEST_NAME, Manifest

__all__ = ["ResumeRefusedError", "locked", "prepare_folder"]

_LOCK_NAME = ".pipesparse.lock"


class ResumeRefusedError(ValueError):
    """The output folder holds the results of a different job (or files of unknown origin)."""


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (released by the OS even on kill -9)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / _LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResumeRefusedError(
                f"another pipesparse run is writing to {folder}; wait for it or use another --out"
            ) from None
        yield


def _remove_output(folder: Path, name: str) -> None:
    """Delete the output shard ``name`` (checked by Manifest.load), unless it is reached through
    a symlinked folder that leads out of ``folder``: nothing outside the folder is deleted."""
    path = folder / name
    if path.parent.resolve().is_relative_to(folder.resolve()):
        path.unlink(missing_ok=True)


def prepare_folder(
    folder: Path, job_fields: dict, shards: list[Shard], overwrite: bool
) -> Manifest:
    """The manifest to continue with (old outputs removed when starting over)."""
    old = None
    try:
        old = Manifest.load(folder)
    except ValueError:
        if not overwrite:
            raise
    if old is not None:
        changes = old.differences(job_fields)
        if changes and not overwrite:
            raise ResumeRefusedError(
                f"{folder} holds the output of a different job, so it cannot be resumed: "
                + "; ".join(changes)
                + ". Rerun with --overwrite to replace it, or use another --out"
            )
        if not changes:
            manifest = Manifest(folder, job_fields, old.shards)
            for name in [n for n in manifest.shards if not manifest.is_complete(n)]:
                del manifest.shards[name]  # missing or altered on disk: redo it
            return manifest
        for name in old.shards:
            _remove_output(folder, name)
    elif not overwrite:
        clashes = [s.name for s in shards if (folder / s.name).exists()]
        if clashes:
            raise ResumeRefusedError(
                f"{folder} already holds {clashes[:3]} but no {MANIFEST_NAME}: they were not "
                "written by pipesparse preprocess. Rerun with --overwrite to replace them"
            )
    return Manifest(folder, job_fields)
