import datasets
import numpy as np
import pyarrow as pa
import pytest

from pipesparse.shards.errors import ShardError
from pipesparse.shards.inputs import discover_shards


def test_files_and_folders_keep_names_and_order(tmp_path, make_shards):
    paths = make_shards(tmp_path / "a", shards=2)
    make_shards(tmp_path / "b" / "nested", shards=1)
    (tmp_path / "b" / "_SUCCESS.parquet").write_text("")
    shards = discover_shards([str(paths[1]), str(tmp_path / "b")])
    assert [s.name for s in shards] == ["part-01.parquet", "nested/part-00.parquet"]
    assert all(s.kind == "parquet" for s in shards)
    batches = list(shards[0].iter_batches(7))
    assert [b.num_rows for b in batches] == [7, 7, 6]
    assert shards[0].num_rows() == 20


def test_saved_dataset_and_dataset_dict(tmp_path):
    rows = {"vec": np.ones((30, 4), np.float32).tolist(), "y": list(range(30))}
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(5))}).save_to_disk(
        str(tmp_path / "dd")
    )
    shards = discover_shards([str(tmp_path / "ds")])
    assert [s.name for s in shards] == [
        "data-00000-of-00002.parquet",
        "data-00001-of-00002.parquet",
    ]
    assert [s.kind for s in shards] == ["arrow", "arrow"]
    assert sum(s.num_rows() for s in shards) == 30
    batches = [b for s in shards for b in s.iter_batches(4)]
    assert max(b.num_rows for b in batches) == 4
    assert [y for b in batches for y in b.column("y").to_pylist()] == list(range(30))
    names = [s.name for s in discover_shards([str(tmp_path / "dd")])]
    assert names == ["train/data-00000-of-00001.parquet", "test/data-00000-of-00001.parquet"]


def test_name_collisions_are_refused(tmp_path, make_shards):
    make_shards(tmp_path / "a", shards=1)
    make_shards(tmp_path / "b", shards=1)
    with pytest.raises(ValueError, match="same output shard 'part-00.parquet'"):
        discover_shards([str(tmp_path / "a"), str(tmp_path / "b")])


def test_missing_and_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(ShardError, match="no such file or directory"):
        discover_shards([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no .parquet files"):
        discover_shards([str(tmp_path / "empty")])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    (shard,) = discover_shards([str(bad)])
    with pytest.raises(ShardError, match=f"file {bad}: cannot read the file"):
        shard.schema()
    arrow = tmp_path / "bad.arrow"
    arrow.write_bytes(b"nope")
    with pytest.raises(ShardError, match="cannot read the file"):
        discover_shards([str(arrow)])[0].schema()


def test_arrow_ipc_file_format_is_read(tmp_path):
    table = pa.table({"v": pa.array([[1.0, 2.0]] * 5)})
    with pa.ipc.new_file(tmp_path / "t.arrow", table.schema) as writer:
        writer.write_table(table)
    (shard,) = discover_shards([str(tmp_path / "t.arrow")])
    assert shard.name == "t.parquet" and shard.num_rows() == 5
    assert sum(b.num_rows for b in shard.iter_batches(2)) == 5


def test_checksums_of_several_files_are_each_files_sha256(tmp_path):
    import hashlib

    from pipesparse.shards.inputs import file_sha256, files_sha256

    paths = []
    for i, size in enumerate([0, 5, 3 << 20]):  # empty, small, three 1 MiB chunks
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(np.random.default_rng(i).bytes(size))
        paths.append(str(path))
    want = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    assert files_sha256(paths) == want == [file_sha256(p) for p in paths]
    assert files_sha256(paths[:1]) == want[:1] and files_sha256([]) == []
