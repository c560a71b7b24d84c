import importlib
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipesparse.shards import (
    ManifestError,
    ResumeRefusedError,
    ShardError,
    fit,
    preprocess,
    read_sparse,
)
from pipesparse.shards.manifest import Manifest

COLUMNS = "vec,img,fixed"
preprocess_module = importlib.import_module("pipesparse.shards.preprocess")


def _run(shards_dir, out, **kwargs):
    kwargs.setdefault("sparsifier", "norm")
    return preprocess([str(shards_dir)], out, kwargs.pop("columns", COLUMNS), quiet=True, **kwargs)


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".parquet")


def test_one_output_per_input_and_pass_through(tmp_path, shards_dir):
    summary = _run(shards_dir, tmp_path / "out", batch_rows=6)
    assert _outputs(tmp_path / "out") == ["part-00.parquet", "part-01.parquet", "part-02.parquet"]
    assert summary.shards == 3 and summary.rows == 60 and summary.skipped == 0
    assert (
        "3 shards -> " in str(summary) and "rows/s" in str(summary) and "vs input" in str(summary)
    )
    source = pq.read_table(shards_dir / "part-01.parquet")
    out = pq.read_table(tmp_path / "out" / "part-01.parquet")
    assert out.column_names == source.column_names
    for name in ("id", "label"):
        assert out.column(name).equals(source.column(name))
    for name in ("vec", "img", "fixed"):
        assert out.schema.field(name).type == source.schema.field(name).type
    zeros = read_sparse(tmp_path / "out" / "part-01.parquet")["vec"].eq(0).float().mean()
    assert zeros == 0.5


def test_manifest_records_job_and_finished_shards(tmp_path, shards_dir):
    fit([str(shards_dir)], "vec", tmp_path / "s.pt", quiet=True)
    _run(shards_dir, tmp_path / "out", columns="vec", sparsifier=None, state=str(tmp_path / "s.pt"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    job = manifest["job"]
    assert job["sparsifier_class"] == "DataNormSparsifier" and job["masks"] == "frozen"
    assert job["state"]["path"] == str(tmp_path / "s.pt") and len(job["state"]["sha256"]) == 64
    assert set(job["inputs"]) == {"part-00.parquet", "part-01.parquet", "part-02.parquet"}
    assert all(len(v["sha256"]) == 64 for v in job["inputs"].values())
    loaded = Manifest.load(tmp_path / "out")
    assert all(loaded.is_complete(n) for n in job["inputs"])
    assert sum(v["rows"] for v in manifest["shards"].values()) == 60


def test_manifest_records_the_sparsifiers_state_dict(tmp_path, shards_dir):
    """DESIGN: the manifest records the sparsifier's state_dict (not only the state file's
    path and checksum): the folder says which masks made it even once that file is gone."""
    from pipesparse import DataNormSparsifier

    fit([str(shards_dir)], "vec", tmp_path / "s.pt", "norm", {"sparsity_level": 0.75}, quiet=True)
    saved = torch.load(tmp_path / "s.pt", weights_only=True)["transform"]["sparsifier"]
    _run(shards_dir, tmp_path / "out", columns="vec", sparsifier=None, state=str(tmp_path / "s.pt"))
    (tmp_path / "s.pt").unlink()
    text = (tmp_path / "out" / "manifest.json").read_text()
    recorded = json.loads(text)["job"]["state_dict"]
    mask = saved["state"]["batch"]["mask"]
    assert recorded["state"]["batch"]["dtype"] == str(mask.dtype)
    assert len(recorded["state"]["batch"]["mask"]) < 2 * mask.numel() + 8  # base64, not a list
    assert recorded["data_groups"]["batch"]["sparsity_level"] == 0.75
    loaded = DataNormSparsifier()
    loaded.load_state_dict(Manifest.load(tmp_path / "out").state_dict())
    assert torch.equal(loaded.get_mask("batch").bool(), saved["state"]["batch"]["mask"])
    broken = Manifest.load(tmp_path / "out")
    entry = broken.job["state_dict"]["state"]["batch"]
    for damage in ({"shape": None}, {"mask": "AAAA"}, {"mask": "not base64!"}, {"dtype": "x"}):
        broken.job["state_dict"]["state"]["batch"] = {**entry, **damage}
        with pytest.raises(ManifestError, match="job\\['state_dict'\\]"):
            broken.state_dict()
    _run(shards_dir, tmp_path / "rows", columns="vec", config={"sparsity_level": 0.75})
    per_row = json.loads((tmp_path / "rows" / "manifest.json").read_text())["job"]
    assert per_row["state_dict"]["state"] == {} and per_row["config"] == {"sparsity_level": 0.75}


def test_frozen_state_masks_every_row_the_same(tmp_path, shards_dir):
    fit([str(shards_dir)], "img", tmp_path / "s.pt", "norm", {"sparsity_level": 0.75}, quiet=True)
    _run(shards_dir, tmp_path / "out", columns="img", sparsifier=None, state=str(tmp_path / "s.pt"))
    images = read_sparse(tmp_path / "out" / "part-02.parquet")["img"]
    mask = torch.load(tmp_path / "s.pt", weights_only=True)["transform"]["sparsifier"]["state"][
        "batch"
    ]["mask"]
    assert torch.equal(images.ne(0), mask.expand_as(images))
    with pytest.raises(ValueError, match="--config does not apply with --state"):
        _run(
            shards_dir,
            tmp_path / "o2",
            columns="img",
            state=str(tmp_path / "s.pt"),
            config={"sparsity_level": 0.5},
        )
    with pytest.raises(ValueError, match="was fitted with --sparsifier norm, not nm"):
        _run(
            shards_dir,
            tmp_path / "o2",
            columns="img",
            sparsifier="nm",
            state=str(tmp_path / "s.pt"),
        )


def test_rerun_resumes_and_redoes_damaged_shards(tmp_path, shards_dir):
    out = tmp_path / "out"
    _run(shards_dir, out)
    first = {p: (out / p).read_bytes() for p in _outputs(out)}
    assert _run(shards_dir, out).skipped == 3
    (out / "part-01.parquet").write_bytes(b"corrupt")
    (out / "part-02.parquet").unlink()
    (out / ".pipesparse-part-00.parquet.999.tmp").write_bytes(b"half")
    summary = _run(shards_dir, out, engine="local", batch_rows=1024)
    assert summary.skipped == 1 and summary.rows == 40
    assert {p: (out / p).read_bytes() for p in _outputs(out)} == first
    assert not list(out.glob(".pipesparse-*.tmp"))


@pytest.mark.parametrize("engine", ["local", "hf", "ray"])
def test_rerun_of_a_finished_job_starts_no_engine(tmp_path, shards_dir, monkeypatch, engine):
    out = tmp_path / "out"
    _run(shards_dir, out)
    before = {p: (out / p).read_bytes() for p in _outputs(out)}

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started for a finished job")

    monkeypatch.setattr(preprocess_module, "make_engine", no_engine)
    summary = _run(shards_dir, out, engine=engine, workers=2)
    assert (summary.shards, summary.skipped, summary.rows) == (3, 3, 0)
    assert {p: (out / p).read_bytes() for p in _outputs(out)} == before


def test_changed_input_or_config_refuses_unless_overwrite(tmp_path, shards_dir, make_shards):
    out = tmp_path / "out"
    _run(shards_dir, out)
    with pytest.raises(ResumeRefusedError, match="config was {}, now {'sparsity_level': 0.7}"):
        _run(shards_dir, out, config={"sparsity_level": 0.7})
    make_shards(shards_dir, shards=3, seed=1)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(
        ResumeRefusedError, match="input shard 'part-00.parquet' .* has changed.*--overwrite"
    ):
        _run(shards_dir, out)
    assert (out / "manifest.json").read_bytes() == before
    _run(shards_dir, out, overwrite=True, config={"sparsity_level": 0.7})
    assert Manifest.load(out).job["config"] == {"sparsity_level": 0.7}


def test_overwrite_removes_outputs_of_the_old_job(tmp_path, make_shards):
    make_shards(tmp_path / "in", shards=3)
    out = tmp_path / "out"
    _run(tmp_path / "in", out)
    preprocess(
        [str(tmp_path / "in" / "part-00.parquet")], out, COLUMNS, "norm", overwrite=True, quiet=True
    )
    assert _outputs(out) == ["part-00.parquet"]


def test_foreign_files_in_the_output_folder_are_not_overwritten(tmp_path, shards_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00.parquet").write_bytes(b"someone's file")
    with pytest.raises(ResumeRefusedError, match="no manifest.json"):
        _run(shards_dir, out)
    assert (out / "part-00.parquet").read_bytes() == b"someone's file"
    _run(shards_dir, out, overwrite=True)
    assert read_sparse(out / "part-00.parquet")["vec"].shape == (20, 8)


def _ragged_shard(folder):
    rows = [[1.0, 2.0, 3.0, 4.0]] * 9 + [[1.0, 2.0]] + [[1.0, 2.0, 3.0, 4.0]] * 5
    pq.write_table(
        pa.table({"v": pa.array(rows, pa.list_(pa.float32()))}), folder / "z-bad.parquet"
    )


def test_bad_rows_fail_cleanly_with_file_column_row(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = pa.table({"v": pa.array([[1.0, 2.0, 3.0, 4.0]] * 5, pa.list_(pa.float32()))})
    pq.write_table(good, folder / "a-good.parquet")
    _ragged_shard(folder)
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=r"z-bad.parquet, column 'v', row 9: ragged row") as info:
        preprocess([str(folder)], out, "v", "threshold", batch_rows=4, quiet=True)
    assert info.value.row == 9
    assert _outputs(out) == ["a-good.parquet"]  # finished before the bad shard, complete
    assert list(Manifest.load(out).shards) == ["a-good.parquet"]
    assert not [
        p for p in os.listdir(out) if p.startswith(".pipesparse-") and p != ".pipesparse.lock"
    ]


@pytest.mark.parametrize(
    ("columns", "error", "message"),
    [
        ("nope", ShardError, "column 'nope': no such column"),
        ("label", TypeError, "column 'label': has type string"),
    ],
)
def test_schema_errors_fail_before_anything_is_written(
    tmp_path, shards_dir, columns, error, message
):
    with pytest.raises(error, match=message):
        _run(shards_dir, tmp_path / "out", columns=columns)
    assert not (tmp_path / "out").exists()


def test_unreadable_shard_names_the_file(tmp_path, shards_dir):
    (shards_dir / "part-09.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ShardError, match="part-09.parquet: cannot read the file"):
        _run(shards_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saved_dataset_input_and_empty_shards(tmp_path, make_shards):
    rows = np.random.default_rng(0).normal(size=(25, 8)).astype(np.float32)
    dataset = datasets.Dataset.from_dict({"vec": rows.tolist(), "y": list(range(25))})
    dataset.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    preprocess([str(tmp_path / "ds")], tmp_path / "out", "vec", "nm", batch_rows=8, quiet=True)
    outputs = _outputs(tmp_path / "out")
    assert outputs == ["data-00000-of-00002.parquet", "data-00001-of-00002.parquet"]
    values = torch.cat([read_sparse(tmp_path / "out" / p)["vec"] for p in outputs])
    assert torch.equal(values.ne(0).reshape(25, 2, 4).sum(-1), torch.full((25, 2), 2))
    make_shards(tmp_path / "e", shards=2, empty_last=True)
    _run(tmp_path / "e", tmp_path / "out_e")
    assert pq.read_table(tmp_path / "out_e" / "part-01.parquet").num_rows == 0


def test_bad_arguments(tmp_path, shards_dir):
    with pytest.raises(ValueError, match="--sparsifier is required"):
        _run(shards_dir, tmp_path / "o", sparsifier=None)
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        _run(shards_dir, tmp_path / "o", engine="spark")
    with pytest.raises(ValueError, match="batch_rows must be an int >= 1"):
        _run(shards_dir, tmp_path / "o", batch_rows=0)
    with pytest.raises(ValueError, match="names a column twice"):
        _run(shards_dir, tmp_path / "o", columns="vec,vec")


def test_output_folder_inside_the_input_folder_is_not_input(tmp_path, shards_dir):
    out = shards_dir / "sparse"
    _run(shards_dir, out)
    again = _run(shards_dir, out)
    assert again.shards == 3 and again.skipped == 3
    assert _outputs(out) == ["part-00.parquet", "part-01.parquet", "part-02.parquet"]


def test_a_bad_first_batch_keeps_the_shard_finished_before_it(tmp_path, vectors_shard):
    folder = tmp_path / "in"
    vectors_shard(folder / "a.parquet", [[1.0, 2.0, 3.0, 4.0]] * 5)
    vectors_shard(folder / "b.parquet", [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]])
    with pytest.raises(ShardError, match=r"b.parquet, column 'e', row 1: ragged row"):
        preprocess([str(folder)], tmp_path / "out", "e", "threshold", quiet=True)
    assert _outputs(tmp_path / "out") == ["a.parquet"]
    assert list(Manifest.load(tmp_path / "out").shards) == ["a.parquet"]
    assert read_sparse(tmp_path / "out" / "a.parquet")["e"].shape == (5, 4)


class _MiscountingEngine:
    """Gives one row too few or too many for the second shard."""

    def __init__(self, job, extra):
        self.job, self.extra = job, extra

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run(self, shards):
        from pipesparse.shards.job import BatchProcessor

        processor = BatchProcessor(self.job)
        for index, shard in enumerate(shards):
            table = processor(next(shard.iter_batches(1000)), shard.path)
            if index == 1:
                table = table.slice(0, table.num_rows + self.extra) if self.extra < 0 else table
                yield index, table
                if self.extra > 0:
                    yield index, table.slice(0, self.extra)
            else:
                yield index, table


@pytest.mark.parametrize(("extra", "message"), [(-1, "gave 19 rows"), (1, "gave more rows")])
def test_an_engine_giving_the_wrong_row_count_records_nothing_wrong(
    tmp_path, shards_dir, monkeypatch, extra, message
):
    # the package's `preprocess` is the function, so the module is imported by name
    module = importlib.import_module("pipesparse.shards.preprocess")
    monkeypatch.setattr(
        module, "make_engine", lambda name, job, *args: _MiscountingEngine(job, extra)
    )
    with pytest.raises(ShardError, match=rf"file .*part-01.parquet: the local engine {message}"):
        _run(shards_dir, tmp_path / "out")
    recorded = Manifest.load(tmp_path / "out").shards
    assert "part-01.parquet" not in recorded
    assert "part-01.parquet" not in _outputs(tmp_path / "out")


class _FailingEngine(_MiscountingEngine):
    def run(self, shards):
        try:
            raise ValueError("disk on fire\n  traceback lines")
        except ValueError as err:
            raise RuntimeError("worker died:\nTraceback (most recent call last): ...") from err
        yield


def test_an_engine_error_is_one_line_naming_the_file(tmp_path, shards_dir, monkeypatch):
    module = importlib.import_module("pipesparse.shards.preprocess")
    monkeypatch.setattr(module, "make_engine", lambda name, job, *args: _FailingEngine(job, 0))
    with pytest.raises(ShardError) as info:
        _run(shards_dir, tmp_path / "out")
    assert str(info.value) == (
        f"file {shards_dir / 'part-00.parquet'}: the local engine failed: ValueError: disk on fire"
    )


@pytest.mark.parametrize("fmt", ["dense", "coo"])
@pytest.mark.parametrize(
    ("kind", "big"), [(pa.int64(), 2**62), (pa.uint64(), 2**63), (pa.int64(), -(2**62))]
)
def test_large_integers_are_kept_exactly(tmp_path, fmt, kind, big):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [[big + 1, big + 3, 3, 5], [7, big + 9, 0, 2]]
    pq.write_table(pa.table({"ids": pa.array(rows, pa.list_(kind))}), folder / "a.parquet")
    preprocess(
        [str(folder)], tmp_path / "out", "ids", "threshold", config={"threshold": 4},
        out_format=fmt, quiet=True,
    )  # fmt: skip
    expected = [[big + 1, big + 3, 0, 5], [7, big + 9, 0, 0]]
    if fmt == "dense":
        table = pq.read_table(tmp_path / "out" / "a.parquet")
        assert table.schema.field("ids").type == pa.list_(kind)
        assert table.column("ids").to_pylist() == expected
    else:
        coo = pq.read_table(tmp_path / "out" / "a.parquet").column("ids").to_pylist()
        assert [row["values"] for row in coo] == [[v for v in r if v] for r in expected]
    decoded = read_sparse(tmp_path / "out" / "a.parquet")["ids"].numpy()
    assert np.array_equal(decoded, np.array(expected, dtype=kind.to_pandas_dtype()))


def test_a_config_that_does_not_fit_the_rows_fails_before_anything_is_written(tmp_path, shards_dir):
    with pytest.raises(
        ValueError, match=r"does not fit column 'img', whose rows have shape \(4, 4\): N:M"
    ):
        _run(shards_dir, tmp_path / "out", columns="vec,img", sparsifier="nm", config={"m": 8})
    assert not (tmp_path / "out").exists()


def test_an_input_file_named_inside_the_output_folder_is_refused(tmp_path, shards_dir):
    _run(shards_dir, tmp_path / "out")
    inside = tmp_path / "out" / "part-00.parquet"
    before = inside.read_bytes()
    with pytest.raises(
        ValueError, match="input file .*part-00.parquet is inside the output folder"
    ):
        preprocess([str(inside)], tmp_path / "out", "vec", "norm", quiet=True)
    assert inside.read_bytes() == before


@pytest.mark.parametrize("kind", [pa.int64(), pa.uint64()])
@pytest.mark.parametrize(
    ("sparsifier", "config"),
    [("threshold", {"threshold": 2**53 + 1}), ("nm", {"n": 1, "m": 4})],
)
def test_integer_rows_are_ranked_exactly_like_the_transform(tmp_path, kind, sparsifier, config):
    """2**53 and 2**53 + 1 are one float64: a threshold of 2**53 + 1 kept 2**53, and a 1:4
    group kept 2**53 over 2**53 + 1. The rows' masks are those SparsifyTransform gives the
    integer tensor itself."""
    from pipesparse.shards.config import make_sparsifier
    from pipesparse.transforms.core import SparsifyTransform

    rows = [[2**53, 2**53 + 1, 5, 7], [2**62 + 1, 2**62, 3, 2**62 + 3]]
    pq.write_table(pa.table({"ids": pa.array(rows, pa.list_(kind))}), tmp_path / "a.parquet")
    preprocess(
        [str(tmp_path / "a.parquet")], tmp_path / "out", "ids", sparsifier, config, quiet=True
    )
    got = read_sparse(tmp_path / "out" / "a.parquet")["ids"]
    data = torch.from_numpy(np.array(rows, dtype=kind.to_pandas_dtype()))
    transform = SparsifyTransform(
        make_sparsifier(sparsifier, config), keys=["ids"], mask_over="batch"
    )
    expected = torch.stack([transform({"ids": row.reshape(1, 4)})["ids"][0] for row in data])
    assert got.tolist() == expected.tolist()
    assert got[0].tolist() == [0, 2**53 + 1, 0, 0]
