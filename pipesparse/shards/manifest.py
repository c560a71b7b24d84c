"""``manifest.json``: what an output folder was made from, and which shards are finished.

The manifest is rewritten atomically after every finished shard, so it always lists exactly
the shards that are complete on disk (each with its rows and sha256). ``job`` is the identity
of the run (sparsifier, config, columns, format, mask mode, state file checksum, input shard
checksums); a rerun resumes only when its job is the same. The job also records the
sparsifier's ``state_dict`` (masks as base64, see :func:`state_dict_to_json`), so the
folder says which masks made it even once the state file is gone.

A loaded manifest is checked key by key (types, and shard names that are plain relative paths
ending in ``.parquet``, never leaving the folder), since resuming and ``--overwrite`` delete
files by those names.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipesparse.base import _dtype_from_name
from pipesparse.shards.errors import ManifestError
from pipesparse.shards.inputs import file_sha256
from pipesparse.shards.writer import atomic_write_bytes

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "state_dict_from_json",
    "state_dict_to_json",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pipesparse.manifest/1"
_JOB_KEYS = ("sparsifier", "sparsifier_class", "config", "columns", "format", "masks")
_JOB_TYPES = {
    **dict.fromkeys(("sparsifier", "sparsifier_class", "format", "masks"), str),
    "config": dict,
    "columns": dict,
    "state": (dict, type(None)),
    "inputs": dict,
}
_STATE_TYPES = {"path": str, "sha256": str}
_INPUT_TYPES = {"path": str, "sha256": str, "bytes": int}
_SHARD_TYPES = {"rows": int, "bytes": int, "sha256": str}
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", type(None): "null"}


def state_dict_to_json(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A sparsifier's ``state_dict()`` (without data) as plain JSON: each mask as the base64 of
    its bytes (little-endian, row-major) with its dtype and shape, compact for large masks (a
    list of numbers would take about 20 bytes an entry); configs with tuples as lists."""
    plain = {key: value for key, value in state_dict.items() if key not in ("state", "data")}
    plain["state"] = {}
    for name, entry in state_dict["state"].items():
        mask = entry["mask"].detach().cpu().contiguous().reshape(-1)
        plain["state"][name] = {
            "mask": base64.b64encode(mask.view(torch.uint8).numpy().tobytes()).decode(),
            "dtype": str(mask.dtype),
            "shape": list(entry["mask"].shape),
        }
    return json.loads(json.dumps(plain, default=str))


def state_dict_from_json(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict :func:`state_dict_to_json` recorded, masks as tensors again:
    ``sparsifier.load_state_dict`` takes it."""
    state = {}
    for name, entry in recorded["state"].items():
        dtype = _dtype_from_name(name, entry["dtype"])
        raw = bytearray(base64.b64decode(entry["mask"], validate=True))
        shape = [int(size) for size in entry["shape"]]
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"mask {name!r} holds {len(raw)} bytes, not a {dtype} {shape}")
        mask = (
            torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        )
        state[name] = {"mask": mask.view(dtype).reshape(shape)}
    return {**recorded, "state": state}


def _is_shard_name(name: str) -> bool:
    """A relative path of a ``.parquet`` file that stays inside the output folder
    (``a.parquet``, ``train/a.parquet``): no ``..``, no absolute path, no backslash."""
    return (
        name.endswith(".parquet")
        and "\\" not in name
        and "\0" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _check_fields(value: Any, types: dict[str, Any], where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {type(value).__name__}, expected an object")
    for key, expected in types.items():
        if key not in value:
            raise ValueError(f"{where} has no key {key!r}")
        kinds = expected if isinstance(expected, tuple) else (expected,)
        found = value[key]
        if not isinstance(found, kinds) or isinstance(found, bool):
            wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
            raise ValueError(f"{where}[{key!r}] is {found!r}, expected {wanted}")


def _check_entries(entries: dict, types: dict[str, Any], where: str) -> None:
    for name, entry in entries.items():
        if not _is_shard_name(name):
            raise ValueError(
                f"{where} name {name!r} is not a relative path of a .parquet file inside the "
                "output folder"
            )
        _check_fields(entry, types, f"{where}[{name!r}]")


def _check(data: Any) -> None:
    """ValueError naming the first key of ``data`` that is not what a manifest holds."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format is {found!r}, expected {MANIFEST_FORMAT!r}")
    _check_fields(data, {"job": dict, "shards": dict}, "the manifest")
    job = data["job"]
    _check_fields(job, _JOB_TYPES, "job")
    if job["state"] is not None:
        _check_fields(job["state"], _STATE_TYPES, "job['state']")
    recorded = job.get("state_dict")  # absent from manifests written before it was recorded
    if recorded is not None and not (
        isinstance(recorded, dict) and isinstance(recorded.get("state"), dict)
    ):
        raise ValueError(f"job['state_dict'] is {recorded!r}, expected a state_dict object")
    _check_entries(job["inputs"], _INPUT_TYPES, "job['inputs']")
    _check_entries(data["shards"], _SHARD_TYPES, "shards")


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
        """The manifest in ``folder``, or None when there is none; ManifestError (naming the
        file and the key) when it is not one pipesparse wrote."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes())
            _check(data)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ManifestError(
                str(path), f"not a pipesparse manifest: {err}; use --overwrite to start over"
            ) from None
        return cls(folder, data["job"], data["shards"])

    def state_dict(self) -> dict[str, Any] | None:
        """The sparsifier's state_dict the job recorded (masks as tensors; None in a manifest
        written before it was recorded): ``sparsifier.load_state_dict`` takes it."""
        recorded = self.job.get("state_dict")
        if recorded is None:
            return None
        try:
            return state_dict_from_json(recorded)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise ManifestError(
                str(self.path), f"job['state_dict'] is not a recorded state_dict: {err!r}"
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
