import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipesparse.shards import ShardError, fit, preprocess, read_sparse


def _decoded(folder):
    return {
        p.name: {k: v.numpy().tobytes() for k, v in read_sparse(p).items()}
        for p in sorted(folder.glob("*.parquet"))
    }


@pytest.mark.parametrize("fmt", ["dense", "coo"])
def test_hf_engine_matches_local(tmp_path, shards_dir, fmt):
    common = dict(columns="vec,img,fixed", sparsifier="norm", out_format=fmt, quiet=True)
    preprocess([str(shards_dir)], tmp_path / "local", batch_rows=7, **common)
    summary = preprocess(
        [str(shards_dir)], tmp_path / "hf", engine="hf", workers=2, batch_rows=16, **common
    )
    assert summary.engine == "hf" and summary.rows == 60
    assert _decoded(tmp_path / "hf") == _decoded(tmp_path / "local")
    for name in ("part-00.parquet", "part-02.parquet"):
        local, hf = (pq.read_table(tmp_path / d / name) for d in ("local", "hf"))
        assert hf.schema.equals(local.schema, check_metadata=True)
        assert hf.column("label").equals(local.column("label"))
    assert not list((tmp_path / "hf").glob(".pipesparse-scratch-*"))
    assert not list(shards_dir.glob("cache-*"))  # no datasets cache next to the input


def test_hf_engine_with_state(tmp_path, shards_dir):
    fit([str(shards_dir)], "img", tmp_path / "s.pt", quiet=True)
    for engine in ("local", "hf"):
        preprocess(
            [str(shards_dir)],
            tmp_path / engine,
            "img",
            state=str(tmp_path / "s.pt"),
            engine=engine,
            quiet=True,
        )
    assert _decoded(tmp_path / "hf") == _decoded(tmp_path / "local")


def test_hf_engine_reports_the_bad_row(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [[1.0, 2.0]] * 11 + [[1.0]] + [[1.0, 2.0]] * 3
    pq.write_table(pa.table({"v": pa.array(rows, pa.list_(pa.float32()))}), folder / "bad.parquet")
    with pytest.raises(ShardError, match=r"bad.parquet, column 'v', row 11: ragged row"):
        preprocess(
            [str(folder)],
            tmp_path / "out",
            "v",
            "threshold",
            engine="hf",
            workers=2,
            batch_rows=4,
            quiet=True,
        )
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_name_with_glob_characters_is_read_as_itself(tmp_path, vectors_shard):
    folder = tmp_path / "in"
    vectors_shard(folder / "a0.parquet", [[1.0, 2.0, 3.0, 4.0]] * 5)
    vectors_shard(folder / "a[0].parquet", [[5.0, 6.0, 7.0, 8.0]] * 5)
    for engine in ("local", "hf"):
        preprocess([str(folder)], tmp_path / engine, "e", "threshold", engine=engine, quiet=True)
    assert _decoded(tmp_path / "hf") == _decoded(tmp_path / "local")
    assert read_sparse(tmp_path / "hf" / "a[0].parquet")["e"][0].tolist() == [5.0, 6.0, 7.0, 8.0]


def test_unreadable_data_is_one_line_naming_the_file(tmp_path, make_shards, damaged):
    make_shards(tmp_path / "in", shards=2)
    damaged(tmp_path / "in" / "part-01.parquet")
    with pytest.raises(ShardError, match=r"part-01.parquet: cannot read the file") as info:
        preprocess(
            [str(tmp_path / "in")], tmp_path / "out", "vec", "norm", engine="hf", workers=2,
            quiet=True,
        )  # fmt: skip
    assert "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == ["part-00.parquet"]


def test_an_arrow_ipc_file_is_read_as_on_the_local_engine(tmp_path):
    table = pa.table({"e": pa.array([[1.0, -2.0, 3.0, 0.5]] * 5, pa.list_(pa.float32()))})
    with pa.ipc.new_file(tmp_path / "t.arrow", table.schema) as writer:  # not a stream
        writer.write_table(table)
    for engine in ("local", "hf"):
        preprocess(
            [str(tmp_path / "t.arrow")], tmp_path / engine, "e", "norm", engine=engine, quiet=True
        )
    assert _decoded(tmp_path / "hf") == _decoded(tmp_path / "local")
