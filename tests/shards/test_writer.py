import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipesparse.shards.inputs import file_sha256
from pipesparse.shards.writer import (
    ShardWriter,
    atomic_write_bytes,
    dictionary_columns,
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


def test_float_columns_are_written_without_a_dictionary_and_others_with_one(tmp_path):
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("x", pa.list_(pa.float32())),
            ("h", pa.list_(pa.float16())),
            ("tags", pa.list_(pa.string())),
            ("m", pa.list_(pa.list_(pa.float64()))),
        ]
    )
    assert dictionary_columns(schema) == ["id", "tags.list.element"]
    table = pa.table(
        {
            "id": [1, 2],
            "x": [[0.0, 1.5], [0.0, 0.0]],
            "h": pa.array([[0.5], [0.0]], pa.list_(pa.float16())),
            "tags": [["a"], ["a", "b"]],
            "m": [[[1.0]], [[0.0]]],
        },
        schema=schema,
    )
    with ShardWriter(tmp_path / "a.parquet", schema) as writer:
        writer.write(table)
        writer.commit()
    assert pq.read_table(tmp_path / "a.parquet").equals(table)
    row_group = pq.read_metadata(tmp_path / "a.parquet").row_group(0)
    encodings = {
        row_group.column(i).path_in_schema: row_group.column(i).encodings
        for i in range(row_group.num_columns)
    }
    dictionary = {path for path, used in encodings.items() if "RLE_DICTIONARY" in used}
    assert dictionary == {"id", "tags.list.element"}
