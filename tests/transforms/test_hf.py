"""hf_map_fn with datasets.Dataset.map: formats, types, num_proc, fingerprint and cache."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Array2D, Dataset, Features, List, Value, load_from_disk
from datasets.fingerprint import Hasher

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, hf_map_fn

ROWS, FEATURES, BATCH = 12, 8, 4


def values(dtype="float32", seed=0):
    return np.random.default_rng(seed).standard_normal((ROWS, FEATURES)).astype(dtype)


def dataset(feature=None, dtype="float32"):
    feature = feature or List(Value(dtype), length=FEATURES)
    features = Features({"x": feature, "label": Value("int64"), "text": Value("string")})
    x = values(dtype)
    if isinstance(feature, Array2D):
        x = x.reshape(ROWS, 2, FEATURES // 2)
    return Dataset.from_dict(
        {"x": x.tolist(), "label": list(range(ROWS)), "text": [f"t{i}" for i in range(ROWS)]},
        features=features,
    )


def transform(update="every_batch", calibrate=True):
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update=update)
    if update == "frozen" and calibrate:
        tf(torch.from_numpy(values(seed=1)))
    return tf


def expected(tf, x):
    """What the transform gives batch by batch, in the main process."""
    return np.concatenate(
        [tf(torch.from_numpy(x[i : i + BATCH])).numpy() for i in range(0, ROWS, BATCH)]
    )


def column(ds):
    return np.array(ds.with_format(None)["x"], dtype=np.float32)


@pytest.mark.parametrize("fmt", [None, "numpy", "torch", "arrow"])
@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_every_format_gives_the_masked_column_and_keeps_the_rest(fmt, update):
    ds = dataset()
    source = ds.with_format(fmt) if fmt else ds
    out = source.map(hf_map_fn(transform(update), "x"), batched=True, batch_size=BATCH)
    np.testing.assert_array_equal(column(out), expected(transform(update), values()))
    assert out.features == ds.features
    assert out.data.schema.field("x").type == ds.data.schema.field("x").type
    assert out.with_format(None)["label"] == list(range(ROWS))
    assert out.with_format(None)["text"] == ds["text"]


@pytest.mark.parametrize(
    "feature",
    [List(Value("float32")), List(Value("float64")), Array2D((2, FEATURES // 2), "float32")],
    ids=["list-float32", "list-float64", "array2d"],
)
@pytest.mark.parametrize("fmt", [None, "arrow", "numpy", "torch"])
def test_arrow_type_is_kept(feature, fmt):
    ds = dataset(feature, dtype=getattr(feature, "dtype", None) or feature.feature.dtype)
    source = ds.with_format(fmt) if fmt else ds
    out = source.map(hf_map_fn(transform(), "x"), batched=True, batch_size=BATCH)
    assert out.features == ds.features
    assert out.data.schema.field("x").type == ds.data.schema.field("x").type
    got = np.array(out.with_format("numpy")["x"]).reshape(ROWS, FEATURES)
    assert (got == 0).mean() == 0.5 and np.isin(got[got != 0], column(ds)).all()


def test_python_batch_list_of_lists_in_list_of_lists_out():
    fn = hf_map_fn(transform(), "x")
    rows = values()[:BATCH].tolist()
    out = fn({"x": rows, "label": [0, 1, 2, 3]})
    assert set(out) == {"x"} and isinstance(out["x"], list) and isinstance(out["x"][0], list)
    np.testing.assert_array_equal(
        np.array(out["x"], dtype=np.float32), expected(transform(), values())[:BATCH]
    )


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_num_proc_2_gives_the_same_dataset(update):
    ds = dataset()
    single = ds.map(hf_map_fn(transform(update), "x"), batched=True, batch_size=BATCH)
    double = ds.map(hf_map_fn(transform(update), "x"), batched=True, batch_size=BATCH, num_proc=2)
    np.testing.assert_array_equal(column(single), column(double))
    assert double.features == ds.features


def test_rerunning_map_hits_the_cache(tmp_path):
    dataset().save_to_disk(tmp_path / "ds")
    ds = load_from_disk(tmp_path / "ds")
    fn = hf_map_fn(transform("frozen"), "x")
    fingerprint = Hasher.hash(fn)
    first = ds.map(fn, batched=True, batch_size=BATCH)
    assert Hasher.hash(fn) == fingerprint  # mapping does not change the function's hash
    second = ds.map(fn, batched=True, batch_size=BATCH)
    again = ds.map(hf_map_fn(transform("frozen"), "x"), batched=True, batch_size=BATCH)
    assert first._fingerprint == second._fingerprint == again._fingerprint
    assert first.cache_files and first.cache_files == second.cache_files == again.cache_files
    other = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
    other(torch.from_numpy(values(seed=2)))  # other masks: another fingerprint, no stale cache
    assert ds.map(hf_map_fn(other, "x"), batched=True)._fingerprint != first._fingerprint


HASH_SCRIPT = """
import numpy as np, torch
from datasets.fingerprint import Hasher
from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, hf_map_fn
tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
tf(torch.from_numpy(np.random.default_rng(1).standard_normal((12, 8)).astype("float32")))
print(Hasher.hash(hf_map_fn(tf, "x")))
"""


def test_fingerprint_is_the_same_in_another_process():
    other = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    assert other.stdout.strip() == Hasher.hash(hf_map_fn(transform("frozen"), "x"))


def test_a_used_every_batch_transform_maps_and_hashes_as_a_fresh_one():
    used = transform()
    for seed in range(3):  # batches of another shape than the map's
        used(torch.randn(1000, 64, generator=torch.Generator().manual_seed(seed)))
    fn = hf_map_fn(used, "x")
    assert Hasher.hash(fn) == Hasher.hash(hf_map_fn(transform(), "x"))
    assert len(pickle.dumps(fn)) < 10_000  # not the last (1000, 64) batch
    ds = dataset()
    out = ds.map(fn, batched=True, batch_size=BATCH)
    assert (
        column(out).tolist()
        == column(ds.map(hf_map_fn(transform(), "x"), batched=True, batch_size=BATCH)).tolist()
    )
    assert used.sparsifier.get_mask("batch").shape == (1000, 64)  # the original is untouched


def test_several_columns_and_integer_columns_named_explicitly():
    ds = Dataset.from_dict(
        {"a": values().tolist(), "b": (values(seed=3) * 10).astype(int).tolist()}
    )
    out = ds.map(hf_map_fn(transform(), ["a", "b"]), batched=True, batch_size=BATCH)
    assert out.features == ds.features
    b = np.array(out["b"])
    assert b.dtype == np.int64 and (b == 0).mean() >= 0.5


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="update=3"):
        hf_map_fn(transform(3), "x")
    with pytest.raises(ValueError, match="calibrate first"):
        hf_map_fn(transform("frozen", calibrate=False), "x")
    with pytest.raises(ValueError, match="columns="):
        hf_map_fn(transform(), [])
    for columns in (3, None):  # not iterable: the same message, not a bare TypeError
        with pytest.raises(ValueError, match="columns="):
            hf_map_fn(transform(), columns)
    with pytest.raises(TypeError, match="SparsifyTransform"):
        hf_map_fn(lambda batch: batch, "x")
    fn = hf_map_fn(transform(), "x")
    with pytest.raises(KeyError, match=r"no column 'x'.*\['y'\]"):
        fn({"y": [[1.0]]})
    with pytest.raises(ValueError, match="different shapes"):
        fn({"x": [[1.0, 2.0], [3.0]]})
    with pytest.raises(TypeError, match="batched=True"):
        fn([1.0, 2.0])


@pytest.mark.parametrize("fmt", [None, "numpy", "torch", "arrow"])
def test_a_numpy_to_torch_transform_gives_the_column_back_as_it_came(fmt):
    ds = dataset(Array2D((2, FEATURES // 2), "float32"))
    source = ds.with_format(fmt) if fmt else ds
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), numpy_to_torch=True)
    out = source.map(hf_map_fn(tf, "x"), batched=True, batch_size=BATCH)
    assert out.features == ds.features
    plain = source.map(hf_map_fn(transform(), "x"), batched=True, batch_size=BATCH)
    np.testing.assert_array_equal(column(out), column(plain))


def test_the_function_gives_each_column_back_in_the_form_the_readme_says():
    """README: python lists stay lists, numpy stays numpy, a torch column comes back as numpy
    of its dtype, an arrow table as an arrow table."""
    fn = hf_map_fn(transform(), "x")
    x = values()[:BATCH]
    assert isinstance(fn({"x": x.tolist()})["x"], list)
    assert fn({"x": x})["x"].dtype == x.dtype
    out = fn({"x": torch.from_numpy(x)})["x"]
    assert isinstance(out, np.ndarray) and out.dtype == x.dtype
    assert isinstance(fn(pa.table({"x": x.tolist()})), pa.Table)


@pytest.mark.parametrize("keys, columns", [(["x", "y"], "x"), ("y", "x"), ("x", ["x", "y"])])
def test_transform_keys_other_than_the_columns_are_refused_up_front(keys, columns):
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), keys=keys)
    with pytest.raises(ValueError, match=r"keys=.*columns="):
        hf_map_fn(tf, columns)


def test_transform_keys_naming_the_columns_are_accepted():
    ds = Dataset.from_dict({"x": values().tolist(), "y": values(seed=3).tolist()})
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), keys=["y", "x"])
    out = ds.map(hf_map_fn(tf, ["x", "y"]), batched=True, batch_size=BATCH)
    assert (np.array(out["x"]) == 0).mean() == 0.5 and (np.array(out["y"]) == 0).mean() == 0.5


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_a_map_without_batched_true_is_refused(fmt, update):
    """One row at a time, every_batch would mask each row on its own, and frozen failed on a
    mask shape; both now say what to do."""
    ds = dataset()
    source = ds.with_format(fmt) if fmt else ds
    with pytest.raises(TypeError, match=r"one row, not a batch .*batched=True"):
        source.map(hf_map_fn(transform(update), "x"))


def test_input_columns_are_refused_with_a_message_that_says_so():
    with pytest.raises(TypeError, match="input_columns"):
        dataset().map(hf_map_fn(transform(), "x"), batched=True, input_columns="x")


def test_a_column_with_nulls_is_not_called_ragged():
    fn = hf_map_fn(transform(), "x")
    with pytest.raises(ValueError, match="None") as err:
        fn({"x": [[1.0, None], [2.0, 3.0]]})
    assert "different shapes" not in str(err.value)


@pytest.mark.parametrize("fmt", [None, "numpy", "torch"])
def test_ragged_rows_are_called_ragged_in_every_format(fmt):
    ds = Dataset.from_dict({"x": [[1.0, 2.0], [3.0], [4.0, 5.0]]})
    source = ds.with_format(fmt) if fmt else ds
    with pytest.raises(ValueError, match="rows of different shapes"):
        source.map(hf_map_fn(transform(), "x"), batched=True)
