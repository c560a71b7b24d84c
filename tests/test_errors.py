"""Typed errors: what they are, what they say, and that bad input leaves the sparsifier unchanged."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from pipesparse import (
    CorruptStateError,
    DataNormSparsifier,
    NMSparsifier,
    ThresholdSparsifier,
    UnknownDataError,
)


def test_unknown_data_error_is_a_key_error_and_a_value_error():
    err = UnknownDataError("y", ["a", "b"])
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert err.name == "y"
    # plain message, not KeyError's quoted repr
    assert str(err) == "no data registered under name 'y'; registered names: 'a', 'b'"


def test_errors_survive_pickling():
    """Errors raised in DataLoader workers or Ray tasks are pickled back to the caller."""
    err = pickle.loads(pickle.dumps(UnknownDataError("y", ["a"])))
    assert isinstance(err, UnknownDataError) and err.name == "y" and err.known == ["a"]
    assert str(err) == str(UnknownDataError("y", ["a"]))
    corrupt = pickle.loads(pickle.dumps(CorruptStateError("bad")))
    assert isinstance(corrupt, CorruptStateError) and str(corrupt) == "bad"


def test_unknown_data_error_lists_at_most_ten_names():
    err = UnknownDataError("y", [f"n{i}" for i in range(13)])
    assert "'n9'" in str(err) and "'n10'" not in str(err) and "(+3 more)" in str(err)
    assert "registered names: none" in str(UnknownDataError("y", []))


def test_code_written_for_the_reference_still_catches_unknown_names():
    """torch.ao raises ValueError for an unknown name; dict-style code catches KeyError."""
    s = ThresholdSparsifier([("a", torch.randn(2))])
    with pytest.raises(ValueError):
        s.get_mask("b")
    with pytest.raises(KeyError):
        s.get_data("b")


def test_corrupt_state_error_is_a_value_error():
    assert issubclass(CorruptStateError, ValueError)
    with pytest.raises(ValueError, match="must be a dict"):
        ThresholdSparsifier().load_state_dict("not a state")


def _norm() -> DataNormSparsifier:
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("a", torch.randn(4, 8), sparsity_level=0.25)
    s.step()
    return s


BAD_ADD_DATA = {
    "unsupported type": (dict(data=[[1.0]]), TypeError, "'x' has unsupported type list"),
    "module that is not an embedding": (
        dict(data=nn.Linear(2, 2)),
        TypeError,
        "unsupported type Linear",
    ),
    "sparse COO data": (
        dict(data=torch.randn(2, 4).to_sparse()),
        TypeError,
        r"'x' has layout torch\.sparse_coo; accepted: dense",
    ),
    "sparse COO data under a registered name": (
        dict(name="a", data=torch.randn(4, 8).to_sparse()),
        TypeError,
        r"'a' has layout torch\.sparse_coo",
    ),
    "bool data for the norm rule": (
        dict(data=torch.ones(2, 4, dtype=torch.bool)),
        TypeError,
        "'x' has dtype torch.bool",
    ),
    "complex data for the norm rule": (
        dict(data=torch.ones(2, 4, dtype=torch.complex64)),
        TypeError,
        "'x' has dtype torch.complex64",
    ),
    "negative zeros_per_block": (dict(zeros_per_block=-1), ValueError, "zeros_per_block=-1"),
    "zeros_per_block above the block size": (
        dict(zeros_per_block=5),
        ValueError,
        "zeros_per_block=5 is outside 0..4",
    ),
    "zeros_per_block not an int": (dict(zeros_per_block=1.5), ValueError, "an int or None"),
    "block with a zero dim": (dict(sparse_block_shape=(0, 4)), ValueError, "two positive ints"),
    "block with one dim": (dict(sparse_block_shape=(4,)), ValueError, "two positive ints"),
    "block of floats": (dict(sparse_block_shape=(1.0, 4.0)), ValueError, "two positive ints"),
    "block as a string": (dict(sparse_block_shape="14"), ValueError, "two positive ints"),
    "NaN sparsity": (dict(sparsity_level=math.nan), ValueError, "sparsity_level must be a number"),
    "string sparsity": (dict(sparsity_level="0.5"), ValueError, "sparsity_level must be a number"),
    "bool sparsity": (dict(sparsity_level=True), ValueError, "sparsity_level must be a number"),
    "bad name": (dict(name="a.b"), ValueError, "invalid data name 'a.b'"),
    "empty name": (dict(name=""), ValueError, "invalid data name ''"),
    "non-str name": (dict(name=3), TypeError, "must be a str, got int"),
    "reuse a mask of another shape": (
        dict(name="a", data=torch.randn(8, 4)),
        ValueError,
        r"reuse the mask of 'a'.*\(4, 8\).*\(8, 4\)",
    ),
    "bad config when replacing": (
        dict(name="a", data=torch.randn(4, 8), zeros_per_block=9),
        ValueError,
        "zeros_per_block=9",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADD_DATA))
def test_bad_add_data_is_a_typed_error_and_changes_nothing(case, unchanged):
    kwargs, error, message = BAD_ADD_DATA[case]
    kwargs = {"name": "x", "data": torch.randn(2, 4), **kwargs}
    s = _norm()
    with unchanged(s), pytest.raises(error, match=message):
        s.add_data(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(norm="L3"), "unknown norm 'L3'; accepted: L1, L2"),
        (dict(zeros_per_block=-1), "zeros_per_block=-1"),
        (dict(sparse_block_shape=(2, 2), zeros_per_block=5), "outside 0..4"),
        (dict(sparse_block_shape=(1, -4)), "two positive ints"),
        (dict(sparse_block_shape=4), r"two positive ints \(height, width\), got 4"),
        (dict(sparsity_level=math.nan), "sparsity_level"),
    ],
)
def test_bad_constructor_config_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataNormSparsifier(**kwargs)


@pytest.mark.parametrize("call", ["get_mask", "get_data", "squash_mask", "is_squashed"])
def test_unknown_name_changes_nothing(call, unchanged):
    s = _norm()
    with unchanged(s), pytest.raises(UnknownDataError, match="'nope'.*registered names: 'a'"):
        if call == "squash_mask":
            s.squash_mask(names=["nope"])
        else:
            getattr(s, call)("nope")


@pytest.mark.parametrize("rule", [DataNormSparsifier, ThresholdSparsifier, NMSparsifier])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_data_is_masked_and_its_state_loads_back(rule, dtype, tmp_path):
    """float8 data was registered, but ThresholdSparsifier's and NMSparsifier's step() raised
    NotImplementedError (no CPU comparisons or sort) after the names before it had new masks,
    and the state DataNormSparsifier wrote was refused by its own load_state_dict."""
    x = torch.tensor([[0.5, -4.0, 0.25, 2.0, 8.0, -0.125, 1.0, -3.0]]).to(dtype)
    s = rule(
        [("a", torch.randn(4, 8)), ("x", x)],
        **({"threshold": 1.0} if rule is ThresholdSparsifier else {}),
    )
    s.step()
    mask = s.get_mask("x")
    assert mask.dtype == dtype
    expected = {
        DataNormSparsifier: [0, 0, 0, 0, 1, 1, 1, 1],
        ThresholdSparsifier: [0, 1, 0, 1, 1, 0, 1, 1],
        NMSparsifier: [0, 1, 0, 1, 1, 0, 0, 1],
    }[rule]
    assert mask.float().view(-1).tolist() == expected
    out = torch.empty_like(x)
    s.step(masked_out={"x": out})
    assert torch.equal(out.float(), x.float() * mask.float())
    torch.save(s.state_dict(), tmp_path / "s.pt")
    t = rule()
    t.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert t.get_mask("x").dtype == dtype and torch.equal(t.get_mask("x"), mask)
    t.squash_mask()
    assert torch.equal(t.get_data("x", return_original=False).float(), out.float())
    s.add_data("i", torch.arange(8).view(1, 8))  # an int64 mask, then reused for float8 data
    assert torch.equal(s.add_data("i", x).float(), x.float())
    if rule is not NMSparsifier:  # 0-d float8: no CPU multiply either
        s.add_data("z", torch.tensor(2.0).to(dtype))
        s.step()
        assert s.get_data("z", return_original=False).float().item() in (0.0, 2.0)


@pytest.mark.parametrize("rule", [DataNormSparsifier, ThresholdSparsifier, NMSparsifier])
@pytest.mark.parametrize("dtype", [torch.float8_e8m0fnu, torch.complex64])
def test_data_of_a_dtype_masks_cannot_have_is_a_type_error_that_changes_nothing(
    rule, dtype, unchanged
):
    """A mask has its data's dtype: one without 0 (float8_e8m0fnu) or complex cannot be one."""
    s = rule([("a", torch.randn(4, 8))])
    s.step()
    with unchanged(s), pytest.raises(TypeError, match=rf"'x' has dtype {dtype}"):
        s.add_data("x", torch.ones(4, 8).to(dtype))
    sd = s.state_dict()
    sd["data"]["a"] = sd["data"]["a"].to(dtype)
    with unchanged(s), pytest.raises(CorruptStateError, match=rf"'a'.*dtype {dtype}"):
        s.load_state_dict(sd)
