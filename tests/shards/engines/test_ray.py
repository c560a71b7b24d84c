"""The Ray Data engine against the local and datasets engines, on one local Ray cluster."""

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipesparse.shards import Manifest, ShardError, fit, preprocess, read_sparse

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # see conftest.py
    yield
    ray.shutdown()


def _decoded(folder):
    return {
        p.relative_to(folder).as_posix(): {
            k: v.numpy().tobytes() for k, v in read_sparse(p).items()
        }
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_three_engines_give_identical_outputs(cluster, tmp_path, make_shards):
    make_shards(tmp_path / "in", shards=3, empty_last=True)
    common = dict(columns="vec,img,fixed", sparsifier="norm", out_format="coo", quiet=True)
    runs = {
        "local": dict(engine="local", batch_rows=7),
        "hf": dict(engine="hf", workers=2, batch_rows=16),
        "ray": dict(engine="ray", workers=2, batch_rows=5),
    }
    for name, kwargs in runs.items():
        summary = preprocess([str(tmp_path / "in")], tmp_path / name, **common, **kwargs)
        assert summary.rows == 40
    local = _decoded(tmp_path / "local")
    assert len(local) == 3
    assert _decoded(tmp_path / "hf") == local
    assert _decoded(tmp_path / "ray") == local
    for shard in ("part-00.parquet", "part-01.parquet", "part-02.parquet"):
        ray_table = pq.read_table(tmp_path / "ray" / shard)
        local_table = pq.read_table(tmp_path / "local" / shard)
        assert ray_table.schema.equals(local_table.schema, check_metadata=True)
        assert ray_table.select(["id", "label"]).equals(local_table.select(["id", "label"]))


def test_ray_with_state_on_a_saved_dataset(cluster, tmp_path):
    rows = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    dataset = datasets.Dataset.from_dict(
        {"path": [f"f{i}" for i in range(30)], "vec": rows.tolist()}
    )
    dataset.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    fit(
        [str(tmp_path / "ds")],
        "vec",
        tmp_path / "s.pt",
        "norm",
        {"sparsity_level": 0.5},
        quiet=True,
    )
    for engine in ("local", "ray"):
        preprocess(
            [str(tmp_path / "ds")], tmp_path / engine, "vec", state=str(tmp_path / "s.pt"),
            engine=engine, workers=2, batch_rows=4, quiet=True,
        )  # fmt: skip
    assert _decoded(tmp_path / "ray") == _decoded(tmp_path / "local")
    table = pq.read_table(tmp_path / "ray" / "data-00001-of-00002.parquet")
    assert table.column("path").to_pylist() == [f"f{i}" for i in range(15, 30)]


def test_ray_reports_the_bad_row(cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [[1.0, 2.0]] * 6
    pq.write_table(pa.table({"v": pa.array(good, pa.list_(pa.float32()))}), folder / "a.parquet")
    bad = good + [[1.0, 2.0, 3.0]] + good
    pq.write_table(pa.table({"v": pa.array(bad, pa.list_(pa.float32()))}), folder / "b.parquet")
    with pytest.raises(ShardError, match=r"b.parquet, column 'v', row 6: ragged row"):
        preprocess(
            [str(folder)],
            tmp_path / "out",
            "v",
            "threshold",
            engine="ray",
            workers=1,
            batch_rows=4,
            quiet=True,
        )
    assert not list((tmp_path / "out").glob("*.parquet")) or [
        p.name for p in (tmp_path / "out").glob("*.parquet")
    ] == ["a.parquet"]


def test_ray_data_settings_are_restored(cluster, tmp_path, shards_dir):
    from ray.data import DataContext

    from pipesparse.shards.engines.ray import BLOCK_BYTES, RayEngine
    from pipesparse.shards.inputs import discover_shards
    from pipesparse.shards.job import build_job

    context = DataContext.get_current()

    def settings():
        return (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.target_max_block_size,
        )

    before = settings()
    job = build_job(discover_shards([str(shards_dir)]), "vec", "threshold", {}, None, "dense")
    with RayEngine(job, batch_rows=8, workers=1):
        assert context.execution_options.preserve_order is True
        assert context.target_max_block_size <= BLOCK_BYTES
    assert settings() == before


def test_many_small_blocks_over_two_actors_keep_every_shard_in_order(
    cluster, tmp_path, make_shards, monkeypatch
):
    import pipesparse.shards.engines.ray as ray_engine

    monkeypatch.setattr(ray_engine, "BLOCK_BYTES", 2048)  # a few rows per Ray Data block
    make_shards(tmp_path / "in", shards=3, rows=60)
    common = dict(columns="vec,img", sparsifier="norm", quiet=True, batch_rows=8)
    preprocess([str(tmp_path / "in")], tmp_path / "local", engine="local", **common)
    preprocess([str(tmp_path / "in")], tmp_path / "ray", engine="ray", workers=2, **common)
    assert _decoded(tmp_path / "ray") == _decoded(tmp_path / "local")
    for shard in ("part-00.parquet", "part-01.parquet", "part-02.parquet"):
        assert pq.read_table(tmp_path / "ray" / shard).equals(
            pq.read_table(tmp_path / "local" / shard)
        )


def _mixed_shards(folder):
    """Shards that differ in column order, pass-through columns and types, under Hive-style
    folders, one named with glob characters."""
    rows = [[1.0, -2.0, 3.0, -4.0], [0.5, 5.0, -6.0, 7.0]]
    tables = {
        "split=train/a?.parquet": pa.table(
            {"e": pa.array(rows, pa.list_(pa.float32())), "id": pa.array([1, 2], pa.int64())}
        ),
        "split=train/b[1].parquet": pa.table(
            {"id": pa.array(["x", "y"], pa.string()), "e": pa.array(rows, pa.list_(pa.float64()))}
        ),
        "split=test/c.parquet": pa.table(
            {
                "e": pa.array(rows, pa.list_(pa.float32())),
                "id": pa.array([3, 4], pa.int32()),
                "extra": pa.array([True, False]),
            }
        ),
    }
    for name, table in tables.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name)


def test_every_shard_keeps_its_own_name_and_schema(cluster, tmp_path):
    _mixed_shards(tmp_path / "in")
    for engine in ("local", "ray"):
        summary = preprocess(
            [str(tmp_path / "in")], tmp_path / engine, "e", "threshold",
            config={"threshold": 1.0}, engine=engine, workers=2, quiet=True,
        )  # fmt: skip
        assert summary.rows == 6
    assert _decoded(tmp_path / "ray") == _decoded(tmp_path / "local")
    for name in ("split=train/a?.parquet", "split=train/b[1].parquet", "split=test/c.parquet"):
        assert pq.read_table(tmp_path / "ray" / name).equals(
            pq.read_table(tmp_path / "local" / name)
        )
    assert pq.read_table(tmp_path / "ray" / "split=train/a?.parquet").num_rows == 2


def test_unreadable_data_is_one_line_naming_the_file(cluster, tmp_path, make_shards, damaged):
    make_shards(tmp_path / "in", shards=2)
    damaged(tmp_path / "in" / "part-01.parquet")
    with pytest.raises(ShardError, match=r"part-01.parquet: cannot read the file") as info:
        preprocess(
            [str(tmp_path / "in")], tmp_path / "out", "vec", "norm", engine="ray", workers=1,
            quiet=True,
        )  # fmt: skip
    assert "\n" not in str(info.value)
    # shards are read in parallel: part-00 is there if it was finished before the error came
    written = [p.name for p in (tmp_path / "out").glob("*.parquet")]
    assert written in ([], ["part-00.parquet"])
    assert list(Manifest.load(tmp_path / "out").shards) == written
