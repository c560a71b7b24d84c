"""ThresholdSparsifier: zero every entry with |x| < threshold, recomputed on every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipesparse import ThresholdSparsifier


def test_entries_below_the_threshold_are_zeroed_and_the_threshold_itself_is_kept():
    x = torch.tensor([-0.6, -0.5, -0.4, 0.0, 0.4, 0.5, 0.6])
    s = ThresholdSparsifier([("x", x)], threshold=0.5)
    s.step()
    assert s.get_mask("x").tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    expected = torch.tensor([-0.6, -0.5, 0.0, 0.0, 0.0, 0.5, 0.6])
    assert torch.equal(s.get_data("x", return_original=False), expected)


def test_default_threshold():
    assert ThresholdSparsifier().defaults == {"threshold": 0.1}


def test_mask_is_recomputed_fresh_so_entries_can_recover():
    x = torch.tensor([0.05, 1.0])
    s = ThresholdSparsifier([("x", x)])
    s.step()
    assert s.get_mask("x").tolist() == [0.0, 1.0]
    x.copy_(torch.tensor([2.0, 0.01]))  # the user's tensor changes in place
    s.step()
    assert s.get_mask("x").tolist() == [1.0, 0.0]


def test_per_name_threshold():
    x = torch.tensor([0.3, 0.7])
    s = ThresholdSparsifier([("default", x)], threshold=0.5)
    s.add_data("low", x, threshold=0.2)
    s.add_data("high", x, threshold=0.8)
    s.step()
    assert s.get_mask("default").tolist() == [0.0, 1.0]
    assert s.get_mask("low").tolist() == [1.0, 1.0]
    assert s.get_mask("high").tolist() == [0.0, 0.0]


def test_zero_or_negative_threshold_keeps_everything():
    x = torch.tensor([0.0, -1.0, 2.0, math.nan])
    for threshold in (0.0, -1.0):
        s = ThresholdSparsifier([("x", x)], threshold=threshold)
        s.step()
        assert s.get_mask("x").tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn]
)
def test_nan_is_kept_as_the_rule_zeroes_only_abs_below_the_threshold(dtype):
    """README and the seed: zero every entry with |x| < threshold; |NaN| < t is false, so NaN
    is kept (never hidden by the mask, as NMSparsifier and DataNormSparsifier keep it)."""
    x = torch.tensor([math.nan, 0.25, 1.0, -math.inf]).to(dtype)
    s = ThresholdSparsifier([("x", x)], threshold=0.5)
    s.step()
    assert s.get_mask("x").float().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert s.get_data("x", return_original=False).float()[0].isnan()


@pytest.mark.parametrize(
    "dtype, values, expected",
    [
        (torch.int8, [-128, -3, -2, 0, 2, 3, 127], [-128, -3, 0, 0, 0, 3, 127]),
        (torch.uint8, [0, 2, 3, 255], [0, 0, 3, 255]),
        (torch.int64, [2**62 + 1, -(2**62) - 1, 2], [2**62 + 1, -(2**62) - 1, 0]),
    ],
)
def test_integer_data_including_the_most_negative_value(dtype, values, expected):
    x = torch.tensor(values, dtype=dtype)
    s = ThresholdSparsifier([("x", x)], threshold=3)
    s.step()
    out = s.get_data("x", return_original=False)
    assert out.dtype == dtype and out.tolist() == expected


@pytest.mark.parametrize(
    "dtype, values, threshold",
    [
        (torch.int32, [2**24, 2**24 + 1, -(2**24) - 1, -(2**24), 5], 2**24 + 1),
        (torch.int32, [2**24, 2**24 + 1, -(2**24) - 1, 3], 2**24 + 0.5),
        (torch.int64, [2**62, 2**62 + 1, -(2**62) - 1, -(2**62)], 2**62 + 1),
        (torch.int64, [2**53, 2**53 + 1, -(2**63), 2**63 - 1], 2**53 + 1),
        (torch.int8, [-128, 127, -127, 5], 128),
        (torch.int8, [-128, 127, -127, 5], 200),
        (torch.uint8, [255, 254, 0], 255),
        (torch.uint16, [2**16 - 1, 2**16 - 2, 0], 2**16 - 1),
        (torch.uint32, [2**24, 2**24 + 1, 2**32 - 1, 0], 2**24 + 1),
        (torch.uint64, [2**63 + 1, 2**63, 2**62, 2**64 - 1], 2**63 + 1),
        (torch.int32, [2**31 - 1, -(2**31), 0], math.inf),
        (torch.int32, [2**31 - 1, -(2**31), 0], -math.inf),
    ],
)
def test_integer_data_is_compared_with_the_threshold_exactly(dtype, values, threshold):
    """|x| < threshold was compared in float32 (a float bound promotes integer data), so values
    within float32's rounding of a threshold above 2**24 were kept (2**24 for 2**24 + 1)."""
    x = torch.tensor(values, dtype=torch.int64 if dtype != torch.uint64 else torch.uint64)
    x = x.to(dtype) if dtype != torch.uint64 else x
    s = ThresholdSparsifier([("x", x)], threshold=threshold)
    s.step()
    expected = [1.0 if abs(v) >= threshold else 0.0 for v in values]
    assert s.get_mask("x").to(torch.float64).tolist() == expected


@given(
    values=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=20),
    threshold=st.floats(-1, 10),
)
def test_mask_is_exactly_abs_at_least_threshold(values, threshold):
    x = torch.tensor(values)
    s = ThresholdSparsifier([("x", x)], threshold=threshold)
    s.step()
    assert torch.equal(s.get_mask("x").bool(), x.abs() >= threshold)


def test_a_numpy_threshold_is_accepted():
    s = ThresholdSparsifier([("x", torch.tensor([0.2, 0.6]))], threshold=np.float32(0.5))
    s.add_data("y", torch.tensor([0.2, 0.6]), threshold=np.float64(0.1))
    s.step()
    assert s.get_mask("x").tolist() == [0.0, 1.0] and s.get_mask("y").tolist() == [1.0, 1.0]
    assert type(s.defaults["threshold"]) is float


@pytest.mark.parametrize("threshold", [math.nan, "0.1", None, True, [0.1], np.bool_(True)])
def test_bad_threshold_is_a_value_error(threshold, unchanged):
    with pytest.raises(ValueError, match="threshold must be a number"):
        ThresholdSparsifier(threshold=threshold)
    s = ThresholdSparsifier([("x", torch.randn(3))])
    with unchanged(s), pytest.raises(ValueError, match="threshold must be a number"):
        s.add_data("x", torch.randn(3), threshold=threshold)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_bool_or_complex_data_is_a_type_error(dtype, unchanged):
    s = ThresholdSparsifier([("x", torch.randn(3))])
    with unchanged(s), pytest.raises(TypeError, match=f"'y' has dtype {dtype}"):
        s.add_data("y", torch.ones(3, dtype=dtype))
