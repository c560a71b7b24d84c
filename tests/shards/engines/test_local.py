from pipesparse.shards.engines.local import LocalEngine
from pipesparse.shards.inputs import discover_shards
from pipesparse.shards.job import build_job


def test_streams_batches_of_at_most_batch_rows_in_order(shards_dir):
    shards = discover_shards([str(shards_dir)])
    job = build_job(shards, "vec", "threshold", {}, None, "dense")
    with LocalEngine(job, batch_rows=6) as engine:
        out = list(engine.run(shards))
    assert [index for index, _ in out] == [0] * 4 + [1] * 4 + [2] * 4
    assert max(table.num_rows for _, table in out) == 6
    ids = [i for _, table in out for i in table.column("id").to_pylist()]
    assert ids == list(range(60))
