import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipesparse.shards.errors import ShardError
from pipesparse.shards.inputs import discover_shards
from pipesparse.shards.schema import find_bad_row, parse_columns, resolve_columns


def _write(path, column):
    pq.write_table(pa.table({"v": column}), path)


def test_parse_columns():
    assert parse_columns("a, b") == ["a", "b"]
    assert parse_columns(["a", "b,c"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no column to sparsify"):
        parse_columns(" , ")


def test_shape_from_first_rows_skipping_empty_shards(tmp_path):
    _write(tmp_path / "a.parquet", pa.array([], pa.list_(pa.float32())))
    _write(tmp_path / "b.parquet", pa.array([[1.0, 2.0, 3.0]]))
    _write(tmp_path / "c.parquet", pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32(), 3)))
    (spec,) = resolve_columns(discover_shards([str(tmp_path)]), ["v"])
    assert spec.shape == (3,) and spec.source.endswith("b.parquet")


def test_fixed_shapes_that_disagree_are_refused(tmp_path):
    _write(tmp_path / "a.parquet", pa.array([[1.0, 2.0]]))
    _write(tmp_path / "b.parquet", pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32(), 3)))
    with pytest.raises(
        ShardError,
        match=r"b.parquet, column 'v': rows have shape \(3,\), but rows in .*a.parquet have shape \(2,\)",
    ):
        resolve_columns(discover_shards([str(tmp_path)]), ["v"])


def test_no_rows_anywhere(tmp_path):
    _write(tmp_path / "a.parquet", pa.array([], pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="no rows in any input shard"):
        resolve_columns(discover_shards([str(tmp_path)]), ["v"])


def test_find_bad_row_scans_in_batches(tmp_path):
    _write(tmp_path / "a.parquet", pa.array([[1.0, 2.0]] * 7 + [None] + [[1.0, 2.0]]))
    (shard,) = discover_shards([str(tmp_path / "a.parquet")])
    (spec,) = resolve_columns([shard], ["v"])
    error = find_bad_row(shard, [spec], batch_rows=3)
    assert (error.column, error.row) == ("v", 7)
    _write(tmp_path / "b.parquet", pa.array([[1.0, 2.0]] * 4))
    assert find_bad_row(discover_shards([str(tmp_path / "b.parquet")])[0], [spec], 3) is None
