"""``manifest.json``: what an output folder was made from, and which shards are finished.

The manifest is rewritten atomically after every finished shard, so it always lists exactly
the shards that are complete on disk (each with its rows and sha256). ``job`` is the identity
of the run (sparsifier, config, columns, format, mask mode, state file checksum, input shard
checksums); a rerun resumes only when its job is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipesparse.shards.inputs import file_sha256
from pipesparse.shards.writer import atomic_write_bytes

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "Manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipesparse.manifest/1"
_JOB_KEYS = ("sparsifier", "sparsifier_class", "config", "columns", "format", "masks")


class Manifest:
    """The manifest of one output folder.

    Args:
        folder: the output folder.
        job: the run's identity (see the module docstring).
        shards: finished output shards, name -> ``{"rows", "bytes", "sha256"}``.
    """

    def __init__(
        self, folder: str | Path, job: dict[str, Any], shards: dict[str, dict] | None = None
    ):
        self.folder = Path(folder)
        self.job = job
        self.shards: dict[str, dict] = dict(shards or {})

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @classmethod
    def load(cls, folder: str | Path) -> Manifest | None:
        """The manifest in ``folder``, or None when there is none."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            return cls(folder, data["job"], data["shards"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{path} is not a pipesparse manifest ({err}); use --overwrite to start over"
            ) from None

    def save(self) -> None:
        payload = {"format": MANIFEST_FORMAT, "job": self.job, "shards": self.shards}
        atomic_write_bytes(
            self.path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
        )

    def record(self, name: str, info: dict[str, Any]) -> None:
        """Mark shard ``name`` finished and save."""
        self.shards[name] = dict(info)
        self.save()

    def is_complete(self, name: str) -> bool:
        """The shard is recorded and the file on disk has the recorded checksum."""
        info = self.shards.get(name)
        path = self.folder / name
        return info is not None and path.is_file() and file_sha256(path) == info.get("sha256")

    def differences(self, job: dict[str, Any]) -> list[str]:
        """Why ``job`` is not the job this folder was made by (empty when it is)."""
        found = []
        for key in _JOB_KEYS:
            if self.job.get(key) != job.get(key):
                found.append(f"{key} was {self.job.get(key)!r}, now {job.get(key)!r}")
        old_state, new_state = self.job.get("state") or {}, job.get("state") or {}
        if old_state.get("sha256") != new_state.get("sha256"):
            found.append(
                f"state file was {old_state.get('path')!r}, now {new_state.get('path')!r} "
                "(different contents)"
            )
        old, new = self.job.get("inputs", {}), job.get("inputs", {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                found.append(f"input shard {name!r} is no longer given")
            elif name not in old:
                found.append(f"input shard {name!r} ({new[name]['path']}) is new")
            elif old[name]["sha256"] != new[name]["sha256"]:
                found.append(f"input shard {name!r} ({new[name]['path']}) has changed")
        return found
