"""Small shards made by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def write_shards(
    folder: Path, shards: int = 3, rows: int = 20, seed: int = 0, empty_last: bool = False
) -> list[Path]:
    """Parquet shards with an id, a label, a 1-D list<float> ``vec`` (8), a fixed-size
    ``fixed`` (8), and a 2-D nested ``img`` (4x4 doubles)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(shards):
        count = 0 if empty_last and index == shards - 1 else rows
        vec = rng.normal(size=(count, 8)).astype(np.float32)
        fixed = rng.normal(size=(count, 8)).astype(np.float32)
        img = rng.normal(size=(count, 4, 4))
        table = pa.table(
            {
                "id": pa.array(np.arange(count) + index * rows, pa.int64()),
                "label": pa.array([f"row{i}" for i in range(count)], pa.string()),
                "vec": pa.array(list(vec), type=pa.list_(pa.float32())),
                "fixed": pa.FixedSizeListArray.from_arrays(pa.array(fixed.ravel()), 8),
                "img": pa.array([r.tolist() for r in img], type=pa.list_(pa.list_(pa.float64()))),
            }
        )
        path = folder / f"part-{index:02d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


@pytest.fixture
def shards_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "in")
    return tmp_path / "in"


def write_vectors(path: Path, rows: list[list[float]], column: str = "e") -> Path:
    """One shard whose ``column`` holds ``rows`` as list<float32> (ragged rows allowed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(rows, pa.list_(pa.float32()))}), path)
    return path


def damage_first_page(path: Path) -> None:
    """Flip the bytes of the shard's first page header: Parquet metadata still reads, the data
    does not."""
    damaged = bytearray(path.read_bytes())
    damaged[4:12] = bytes(b ^ 0xFF for b in damaged[4:12])
    path.write_bytes(damaged)


@pytest.fixture
def vectors_shard():
    """``vectors_shard(path, rows, column="e") -> path``: see :func:`write_vectors`."""
    return write_vectors


@pytest.fixture
def damaged():
    """``damaged(path)``: see :func:`damage_first_page`."""
    return damage_first_page


@pytest.fixture
def make_shards():
    """``make_shards(folder, shards=3, rows=20, seed=0, empty_last=False) -> [paths]``."""
    return write_shards
