import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesparse.shards.columns import ColumnSpec, column_spec, from_tensor, to_tensor
from pipesparse.shards.errors import ShardError, ShardTypeError

TYPES = {
    "list<float>": (pa.list_(pa.float32()), (3,)),
    "large_list<double>": (pa.large_list(pa.float64()), (3,)),
    "fixed<float>[3]": (pa.list_(pa.float32(), 3), (3,)),
    "list<list<double>>": (pa.list_(pa.list_(pa.float64())), (2, 3)),
    "fixed<fixed<float>>": (pa.list_(pa.list_(pa.float32(), 3), 2), (2, 3)),
    "list<int64>": (pa.list_(pa.int64()), (3,)),
    "list<halffloat>": (pa.list_(pa.float16()), (3,)),
}


@pytest.mark.parametrize("name", list(TYPES))
def test_round_trip_keeps_type_and_values(name):
    dtype, shape = TYPES[name]
    values = np.arange(4 * int(np.prod(shape))).reshape(4, *shape) - 5
    array = pa.array(values.tolist(), type=dtype)
    spec = column_spec("f.parquet", pa.schema([("c", dtype)]), "c", array.slice(0, 1))
    assert spec.shape == shape
    tensor = to_tensor(array, spec, "f.parquet", 0)
    assert tensor.shape == (4, *shape)
    assert np.array_equal(tensor.numpy(), values)
    back = from_tensor(tensor, dtype)
    assert back.type == dtype and back.equals(array)


def test_sliced_array_converts_its_own_rows():
    array = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32()))
    spec = ColumnSpec("c", (2,), "f")
    assert to_tensor(array.slice(1, 2), spec, "f", 0).tolist() == [[3.0, 4.0], [5.0, 6.0]]


@given(rows=st.integers(0, 5), width=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_nested_round_trip_property(rows, width, seed):
    values = np.random.default_rng(seed).normal(size=(rows, 2, width)).astype(np.float32)
    dtype = pa.list_(pa.list_(pa.float32()))
    array = pa.array(values.tolist(), type=dtype)
    tensor = to_tensor(array, ColumnSpec("c", (2, width), "f"), "f", 0)
    assert torch.equal(tensor, torch.from_numpy(values))
    assert from_tensor(tensor, dtype).equals(array)


def test_ragged_row_names_file_column_and_row():
    array = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0]], pa.list_(pa.float32()))
    with pytest.raises(
        ShardError, match=r"file s\.parquet, column 'c', row 12: ragged row"
    ) as info:
        to_tensor(array, ColumnSpec("c", (2,), "first.parquet"), "s.parquet", 10)
    assert (info.value.file, info.value.column, info.value.row) == ("s.parquet", "c", 12)


def test_ragged_inner_list_reports_the_outer_row():
    array = pa.array([[[1.0], [2.0]], [[3.0], [4.0, 5.0]]])
    with pytest.raises(ShardError, match="row 1: ragged row"):
        to_tensor(array, ColumnSpec("c", (2, 1), "f"), "f", 0)


@pytest.mark.parametrize(
    ("values", "what"),
    [([[1.0, 2.0], None], "null list"), ([[1.0, 2.0], [None, 1.0]], "null value")],
)
def test_null_rows_are_errors(values, what):
    with pytest.raises(ShardError, match=f"row 1: row holds a {what}"):
        to_tensor(pa.array(values), ColumnSpec("c", (2,), "f"), "f", 0)


@pytest.mark.parametrize(
    "dtype", [pa.string(), pa.list_(pa.string()), pa.list_(pa.bool_()), pa.float32()]
)
def test_non_numeric_column_is_a_type_error(dtype):
    with pytest.raises(
        ShardTypeError, match="column 'c': has type .* cannot be sparsified"
    ) as info:
        column_spec("f", pa.schema([("c", dtype)]), "c", None)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_missing_column_lists_what_the_file_has():
    with pytest.raises(ShardError, match="column 'nope': no such column; the file has: a, b"):
        column_spec("f", pa.schema([("a", pa.int64()), ("b", pa.int64())]), "nope", None)


def test_empty_nested_rows_are_not_called_null():
    """A first row [] of a list<list<float>> column was 'row holds a null list'."""
    dtype = pa.list_(pa.list_(pa.float32()))
    array = pa.array([[], []], type=dtype)
    spec = column_spec("f", pa.schema([("c", dtype)]), "c", array.slice(0, 1))
    assert spec.shape == (0, 0)
    assert to_tensor(array, spec, "f", 0).shape == (2, 0, 0)
    assert from_tensor(to_tensor(array, spec, "f", 0), dtype).equals(array)
    with pytest.raises(ShardError, match="row 0: row holds a null list"):
        column_spec("f", pa.schema([("c", dtype)]), "c", pa.array([[None]], type=dtype))
