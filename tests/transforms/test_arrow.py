"""Fixed-shape Arrow columns to numpy and back with the exact Arrow type."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipesparse.transforms import _arrow


@pytest.mark.parametrize(
    "arrow_type, shape",
    [
        (pa.float32(), (5,)),
        (pa.list_(pa.float32()), (5, 4)),
        (pa.list_(pa.float64(), 4), (5, 4)),
        (pa.large_list(pa.float16()), (5, 4)),
        (pa.list_(pa.list_(pa.float32(), 2)), (5, 3, 2)),
        (pa.list_(pa.int32()), (5, 4)),
    ],
)
def test_round_trip_keeps_values_and_type(arrow_type, shape):
    values = np.random.default_rng(0).standard_normal(shape) * 10
    array = pa.array(values.tolist() if len(shape) > 1 else values, type=arrow_type)
    chunked = pa.chunked_array([array[:2], array[2:]])  # sliced chunks, offsets not at 0
    dense = _arrow.to_numpy(chunked, "x")
    assert dense.shape == shape and dense.dtype == arrow_type_leaf(arrow_type).to_pandas_dtype()
    back = _arrow.from_numpy(dense, arrow_type)
    assert back.type == arrow_type and back.equals(array)


def arrow_type_leaf(arrow_type):
    while hasattr(arrow_type, "value_type"):
        arrow_type = arrow_type.value_type
    return arrow_type


def test_ragged_null_and_non_numeric_columns_are_refused():
    with pytest.raises(ValueError, match="'x' has rows of different lengths"):
        _arrow.to_numpy(pa.array([[1.0, 2.0], [3.0]]), "x")
    with pytest.raises(ValueError, match="'x' has null rows"):
        _arrow.to_numpy(pa.array([[1.0, 2.0], None]), "x")
    with pytest.raises(TypeError, match="'x' holds string"):
        _arrow.to_numpy(pa.array([["a"], ["b"]]), "x")
    with pytest.raises(TypeError, match="with nulls"):
        _arrow.to_numpy(pa.array([[1.0, None]]), "x")
