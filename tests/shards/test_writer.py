import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipesparse.shards.inputs import file_sha256
from pipesparse.shards.writer import (
    ShardWriter,
    atomic_write_bytes,
    remove_temp_files,
)

SCHEMA = pa.schema([("x", pa.int64())], metadata={b"k": b"v"})


def test_commit_publishes_and_reports(tmp_path):
    with ShardWriter(tmp_path / "sub" / "a.parquet", SCHEMA) as writer:
        writer.write(pa.table({"x": [1, 2]}, schema=SCHEMA))
        assert not (tmp_path / "sub" / "a.parquet").exists()  # still a temp file
        writer.write(pa.table({"x": [3]}, schema=SCHEMA))
        info = writer.commit()
    path = tmp_path / "sub" / "a.parquet"
    assert info == {"rows": 3, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3]
    assert pq.read_schema(path).metadata[b"k"] == b"v"
    assert os.listdir(tmp_path / "sub") == ["a.parquet"]


def test_error_before_commit_leaves_nothing(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "a.parquet", SCHEMA) as writer:
            writer.write(pa.table({"x": [1]}, schema=SCHEMA))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["a.parquet"]
    assert (tmp_path / "a.parquet").read_bytes() == b"old"


def test_atomic_write_and_leftover_cleanup(tmp_path):
    atomic_write_bytes(tmp_path / "m.json", b"{}")
    assert (tmp_path / "m.json").read_bytes() == b"{}"
    stale = tmp_path / "d" / ".pipesparse-x.parquet.123.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    (tmp_path / ".pipesparse-scratch-abc").mkdir()
    (tmp_path / "keep.tmp").write_bytes(b"user file")
    removed = remove_temp_files(tmp_path)
    assert len(removed) == 2 and not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["d", "keep.tmp", "m.json"]


def test_repetitive_float_columns_stay_dictionary_encoded_and_small(tmp_path):
    """Pixel-like floats (few distinct values) must not grow when rewritten: a writer without a
    dictionary for floats made the digits demo's shards 80% larger than their input."""
    values = np.random.default_rng(0).integers(0, 17, size=(4096, 64)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 64)
    table = pa.table({"id": pa.array(range(4096), pa.int64()), "x": column})
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    with ShardWriter(tmp_path / "out.parquet", table.schema) as writer:
        writer.write(table)
        writer.commit()
    assert pq.read_table(tmp_path / "out.parquet").equals(table)
    encodings = pq.read_metadata(tmp_path / "out.parquet").row_group(0).column(1).encodings
    assert "RLE_DICTIONARY" in encodings
    assert (tmp_path / "out.parquet").stat().st_size <= 1.05 * source.stat().st_size
