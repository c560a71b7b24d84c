"""BaseDataSparsifier.state_dict / load_state_dict: format, round trips, corrupt and foreign states."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipesparse import CorruptStateError, DataNormSparsifier, ThresholdSparsifier
from pipesparse.base import STATE_FORMAT


def _fitted() -> DataNormSparsifier:
    """Three names: float32 2-D, float64 3-D, and one squashed; masks fitted by one step."""
    s = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    s.add_data("a", torch.randn(4, 6))
    s.add_data("b", torch.randn(2, 3, 4, dtype=torch.float64), sparsity_level=0.25)
    s.add_data("c", torch.randn(3, 4), zeros_per_block=1)
    s.step()
    s.squash_mask(names=["c"])
    return s


def _assert_equivalent(x, y) -> None:
    """Same names, masks (dtype and values), configs, data and squashed status."""
    assert list(x.data_groups) == list(y.data_groups)
    assert x.data_groups == y.data_groups
    for name in x.data_groups:
        mx, my = x.get_mask(name), y.get_mask(name)
        assert mx.dtype == my.dtype and torch.equal(mx, my), name
        assert x.is_squashed(name) == y.is_squashed(name), name
        assert torch.equal(
            x.get_data(name, return_original=False), y.get_data(name, return_original=False)
        )


# -- format -----------------------------------------------------------------------------------
def test_state_dict_stores_masks_as_bool_and_remembers_their_dtype():
    s = _fitted()
    sd = s.state_dict()
    assert sd["format"] == STATE_FORMAT
    assert set(sd) == {"format", "state", "mask_dtypes", "data_groups", "squashed", "data"}
    for name in "abc":
        mask = sd["state"][name]["mask"]
        # bool: exact and 1 byte per entry (see test_bool_masks_are_smaller_than_sparse_coo)
        assert mask.dtype == torch.bool and mask.layout == torch.strided
        assert mask.element_size() == 1
        assert torch.equal(mask, s.get_mask(name).bool())
    assert sd["mask_dtypes"] == {"a": "torch.float32", "b": "torch.float64", "c": "torch.float32"}
    assert sd["squashed"] == ["c"]
    assert sd["data_groups"]["b"]["sparsity_level"] == 0.25


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bool_masks_are_smaller_than_sparse_coo(sparsity):
    """torch.ao saves masks as sparse COO: 8 bytes of index per dim per kept entry."""
    s = DataNormSparsifier([("x", torch.randn(200, 200))], sparsity_level=sparsity)
    s.step()
    ours = io.BytesIO()
    torch.save(s.state_dict(include_data=False), ours)
    coo = io.BytesIO()
    torch.save(s.get_mask("x").to(torch.int8).to_sparse_coo(), coo)
    assert len(ours.getvalue()) < len(coo.getvalue())


def test_state_dict_masks_are_copies_of_the_live_masks():
    s = _fitted()
    sd = s.state_dict()
    s.get_mask("a").zero_()
    assert sd["state"]["a"]["mask"].any()


def test_soft_masks_are_kept_exactly():
    s = ThresholdSparsifier([("x", torch.randn(3))])
    s.get_mask("x").copy_(torch.tensor([0.25, 1.0, 0.0]))
    sd = s.state_dict()
    assert sd["state"]["x"]["mask"].dtype == torch.float32
    t = ThresholdSparsifier()
    t.load_state_dict(sd)
    assert t.get_mask("x").tolist() == [0.25, 1.0, 0.0]


def test_include_data_false_leaves_data_out():
    sd = _fitted().state_dict(include_data=False)
    assert "data" not in sd
    assert set(sd["state"]) == {"a", "b", "c"}


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_restores_masks_configs_data_and_squashed_status():
    s = _fitted()
    t = DataNormSparsifier()
    t.load_state_dict(s.state_dict())
    _assert_equivalent(s, t)
    with pytest.raises(ValueError, match="squashed"):
        t.get_data("c")
    assert torch.equal(t.get_data("a"), s.get_data("a"))
    # the restored sparsifier keeps working like the original
    s.step()
    t.step()
    _assert_equivalent(s, t)


def test_round_trip_through_torch_save_with_weights_only(tmp_path):
    s = _fitted()
    torch.save(s.state_dict(), tmp_path / "state.pt")
    t = DataNormSparsifier()
    t.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    _assert_equivalent(s, t)


def test_loaded_sparsifiers_do_not_share_masks_or_data_with_the_source():
    s = _fitted()
    user_tensor = s.get_data("a")
    before = user_tensor.clone()
    sd = s.state_dict()
    t, u = DataNormSparsifier(), DataNormSparsifier()
    t.load_state_dict(sd)
    u.load_state_dict(sd)
    t.get_mask("a").zero_()
    assert u.get_mask("a").any() and s.get_mask("a").any()
    t.squash_mask()  # writes masked values into t's own copy of the data, not the user's tensor
    assert torch.equal(user_tensor, before)


def test_load_copies_into_an_existing_mask_in_place():
    """The contract that keeps shared-memory masks shared across processes."""
    s = _fitted()
    t = DataNormSparsifier()
    t.add_data("a", torch.randn(4, 6))
    mask = t.get_mask("a")
    ptr = mask.data_ptr()
    t.load_state_dict(s.state_dict(include_data=False), strict=False)
    assert t.get_mask("a") is mask and mask.data_ptr() == ptr
    assert torch.equal(mask, s.get_mask("a"))


def test_load_over_a_mask_of_another_dtype_never_truncates_and_keeps_0_1_masks_in_place():
    """An existing mask of the same shape but another dtype must not truncate the loaded one
    (a soft 0.5 copied into an int64 mask became 0): it is replaced. A 0/1 mask, exact in
    every dtype, is written in place (a mask in shared memory must stay shared)."""
    s = ThresholdSparsifier([("x", torch.randn(3)), ("h", torch.randn(2, 4, dtype=torch.float16))])
    s.step()
    s.get_mask("x").copy_(torch.tensor([0.5, 1.0, 0.0]))
    sd = s.state_dict()
    t = ThresholdSparsifier([("x", torch.arange(3)), ("h", torch.randn(2, 4))])
    live = t.get_mask("h")
    t.load_state_dict(sd)
    assert t.get_mask("x").dtype == torch.float32
    assert t.get_mask("x").tolist() == [0.5, 1.0, 0.0]
    assert (
        t.get_data("x", return_original=False).tolist()
        == (s.get_data("x") * sd["state"]["x"]["mask"]).tolist()
    )
    assert t.get_mask("h").dtype == torch.float32 and t.get_mask("h") is live
    assert torch.equal(t.get_mask("h"), s.get_mask("h").float())


def test_loading_a_state_without_data_keeps_the_attached_data_or_has_none():
    s = _fitted()
    x = torch.randn(4, 6)
    t = DataNormSparsifier([("a", x)])
    t.load_state_dict(s.state_dict(include_data=False))
    assert t.get_data("a") is x  # kept: the shape matches the loaded mask
    with pytest.raises(ValueError, match="no data attached to 'b'"):
        t.get_data("b")
    t.step()  # names without data are skipped
    assert torch.equal(t.get_mask("b"), s.get_mask("b"))
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    t.add_data("b", y)  # attaching data reuses the loaded mask
    assert torch.equal(t.get_data("b", return_original=False), y * s.get_mask("b"))


def test_a_state_without_data_keeps_data_only_of_the_same_squashed_status():
    """Squashed data holds masked values, unsquashed data the originals: the attached data
    of the other kind would be read as what it is not."""
    s = _fitted()  # "c" squashed
    x = torch.randn(3, 4)
    t = DataNormSparsifier([("c", x)])
    t.load_state_dict(s.state_dict(include_data=False))
    assert t.is_squashed("c")
    with pytest.raises(ValueError, match="no data attached to 'c'"):
        t.get_data("c", return_original=False)  # not x unmasked, as if it were masked
    assert torch.equal(t.get_mask("c"), s.get_mask("c"))
    u = DataNormSparsifier([("c", x)])
    u.squash_mask()  # squashed here too: kept
    u.load_state_dict(s.state_dict(include_data=False))
    assert u.get_data("c", return_original=False) is x
    v = DataNormSparsifier([("a", torch.randn(4, 6))])
    v.squash_mask()  # its data holds masked values, not the originals of unsquashed "a"
    v.load_state_dict(s.state_dict(include_data=False))
    with pytest.raises(ValueError, match="no data attached to 'a'"):
        v.get_data("a")


def test_strict_load_drops_other_names_and_non_strict_keeps_them():
    s = _fitted()
    t = DataNormSparsifier([("other", torch.randn(2, 4))])
    t.load_state_dict(s.state_dict(), strict=False)
    assert set(t.data_groups) == {"other", "a", "b", "c"}
    t.load_state_dict(s.state_dict(), strict=True)
    assert set(t.data_groups) == {"a", "b", "c"}


def test_loading_unsquashes_a_name_the_state_has_unsquashed():
    s = _fitted()
    t = DataNormSparsifier()
    t.load_state_dict(s.state_dict())
    t.squash_mask()
    t.load_state_dict(s.state_dict())
    assert not t.is_squashed("a") and t.is_squashed("c")


def test_pickle_and_deepcopy():
    s = _fitted()
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        _assert_equivalent(s, clone)
        clone.get_mask("a").zero_()
        assert s.get_mask("a").any()  # independent copies
        clone.step()
        s_copy = copy.deepcopy(s)
        s_copy.step()
        assert torch.equal(clone.get_mask("a"), s_copy.get_mask("a"))


def test_integer_mask_dtype_is_restored():
    x = torch.tensor([5, 1, -7], dtype=torch.int32)
    s = ThresholdSparsifier([("x", x)], threshold=2)
    s.step()
    t = ThresholdSparsifier()
    t.load_state_dict(s.state_dict())
    assert t.get_mask("x").dtype == torch.int32
    assert t.get_data("x", return_original=False).tolist() == [5, 0, -7]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_integer_data_state_loads_back(dtype, tmp_path):
    """Unsigned data gets a mask of its dtype; the state it writes must load back (it was a
    CorruptStateError: 'unknown mask dtype torch.uint32')."""
    x = torch.tensor([[5, 1, 7, 0], [2, 9, 3, 4]]).to(dtype)
    s = DataNormSparsifier([("x", x)], sparsity_level=0.5, sparse_block_shape=(1, 2))
    s.step()
    torch.save(s.state_dict(), tmp_path / "s.pt")
    t = DataNormSparsifier()
    t.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    _assert_equivalent(s, t)
    assert t.get_mask("x").dtype == dtype


# -- torch.ao's format ----------------------------------------------------------------------------
def test_loads_a_real_torch_ao_state_dict():
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as Reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Reference(sparsity_level=0.5, sparse_block_shape=(1, 2))
        ref.add_data("a", torch.randn(4, 6))
        ref.add_data("b", torch.randn(3, 4), sparsity_level=0.25, zeros_per_block=1)
        ref.add_data("c", torch.randn(2, 8))
        ref.step()
        ref.squash_mask(names=["c"])
        sd = ref.state_dict()
    assert sd["state"]["a"]["mask"].layout == torch.sparse_coo  # the reference's format

    ours = DataNormSparsifier()
    ours.load_state_dict(sd)
    assert dict(ours.data_groups) == dict(ref.data_groups)
    for name in "ab":
        assert torch.equal(ours.get_mask(name).bool(), ref.get_mask(name).bool())
        assert torch.equal(ours.get_data(name), ref.get_data(name))
        assert not ours.is_squashed(name)
    assert ours.is_squashed("c")
    assert torch.equal(ours.get_data("c", return_original=False), ref.get_data("c", False))
    ours.step()  # recomputing gives the same masks as the reference computed
    for name in "ab":
        assert torch.equal(ours.get_mask(name).bool(), ref.get_mask(name).bool())


def test_torch_ao_state_without_the_data_is_corrupt(unchanged):
    s = _fitted()
    foreign = {
        "state": {"a": {"mask": torch.ones(2, 2).to_sparse_coo()}},
        "data_groups": {"a": dict(s.data_groups["a"])},
        "_container": {},
    }
    with unchanged(s), pytest.raises(CorruptStateError, match="torch.ao state_dict has no data"):
        s.load_state_dict(foreign)


# -- corrupt states -------------------------------------------------------------------------------
def _set(path, value):
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return sd

    return mutate


def _delete(path):
    def mutate(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return sd

    return mutate


CORRUPTIONS = {
    "not a dict": (lambda sd: [sd], "must be a dict"),
    "missing state": (_delete(["state"]), "missing the 'state'"),
    "missing data_groups": (_delete(["data_groups"]), "missing the 'data_groups'"),
    "state not a dict": (_set(["state"], [1]), "missing the 'state'"),
    "foreign format": (_set(["format"], "other/9"), "format 'other/9'"),
    "entry not a dict": (_set(["state", "a"], torch.ones(4, 6)), "'a' is not a tensor"),
    "missing mask": (_delete(["state", "a", "mask"]), "'a' is not a tensor"),
    "mask not a tensor": (_set(["state", "a", "mask"], [[1, 0]]), "'a' is not a tensor"),
    "complex mask": (
        _set(["state", "a", "mask"], torch.ones(4, 6, dtype=torch.complex64)),
        "'a' has dtype torch.complex64",
    ),
    "data shape != mask shape": (_set(["data", "a"], torch.randn(6, 4)), r"'a' is \(6, 4\)"),
    "mask shape != data shape": (
        _set(["state", "a", "mask"], torch.ones(4, 5, dtype=torch.bool)),
        r"'a' is \(4, 6\); its mask has shape \(4, 5\)",
    ),
    "data not a tensor": (_set(["data", "a"], [1.0]), "'a' is list"),
    "bool data for the norm rule": (
        _set(["data", "a"], torch.ones(4, 6, dtype=torch.bool)),
        "'a'.*real numbers",
    ),
    "sparse COO data": (
        _set(["data", "a"], torch.randn(4, 6).to_sparse()),
        "'a'.*layout torch.sparse_coo",
    ),
    "data not a dict": (_set(["data"], [1]), "'data' must be a dict"),
    "names differ": (_delete(["data_groups", "b"]), "names differ"),
    "extra config": (_set(["data_groups", "z"], {}), "names differ"),
    "data for unknown name": (_set(["data", "z"], torch.ones(1)), "without a mask: \\['z'\\]"),
    "unknown mask dtype": (_set(["mask_dtypes", "a"], "torch.float7"), "'torch.float7'"),
    "mask dtype not a string": (_set(["mask_dtypes", "a"], torch.float32), "unknown mask dtype"),
    "mask_dtypes not a dict": (_set(["mask_dtypes"], "torch.float32"), "'mask_dtypes' must"),
    "squashed not a list": (_set(["squashed"], 3), "'squashed' must be a list"),
    "squashed unknown": (_set(["squashed"], ["nope"]), "without a mask"),
    "config not a dict": (_set(["data_groups", "a"], 0.5), "config for 'a' is not a dict"),
    "invalid config": (
        _set(["data_groups", "a", "zeros_per_block"], -1),
        "config for 'a' is invalid: zeros_per_block=-1",
    ),
    "config of another sparsifier": (
        _set(["data_groups", "a"], {"threshold": 0.1}),
        "config for 'a' is invalid",
    ),
}


def _with_bad_name(sd):
    for key in ("state", "data_groups", "data"):
        sd[key]["x.y"] = sd[key].pop("a")
    sd["mask_dtypes"]["x.y"] = sd["mask_dtypes"].pop("a")
    return sd


CORRUPTIONS["dotted name"] = (_with_bad_name, "bad name")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_state_is_rejected_and_leaves_the_sparsifier_unchanged(case, strict, unchanged):
    mutate, message = CORRUPTIONS[case]
    bad = mutate(copy.deepcopy(_fitted().state_dict()))
    s = DataNormSparsifier([("kept", torch.randn(2, 4))], sparsity_level=0.5)
    s.add_data("a", torch.randn(4, 6))
    s.step()
    with unchanged(s), pytest.raises(CorruptStateError, match=message):
        s.load_state_dict(bad, strict=strict)


# -- property: round trips ------------------------------------------------------------------------
NAMES = st.text(
    alphabet=st.characters(blacklist_characters=".", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=8,
)
SHAPE = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])


@given(
    entries=st.dictionaries(
        NAMES,
        st.tuples(SHAPE, DTYPES, st.floats(0, 2), st.booleans(), st.integers(0, 2**16)),
        max_size=4,
    ),
    include_data=st.booleans(),
)
def test_state_dict_round_trip_property(tmp_path_factory, entries, include_data):
    s = ThresholdSparsifier(threshold=0.5)
    for name, (shape, dtype, threshold, _, seed) in entries.items():
        g = torch.Generator().manual_seed(seed)
        s.add_data(name, (torch.randn(shape, generator=g) * 3).to(dtype), threshold=threshold)
    s.step()
    s.squash_mask(names=[n for n, e in entries.items() if e[3]])
    sd = s.state_dict(include_data=include_data)
    path = tmp_path_factory.mktemp("sd") / "state.pt"
    torch.save(sd, path)
    t = ThresholdSparsifier([("stale", torch.randn(2))])
    t.load_state_dict(torch.load(path, weights_only=True))
    assert list(t.data_groups) == list(s.data_groups) and t.data_groups == s.data_groups
    for name in s.data_groups:
        assert t.get_mask(name).dtype == s.get_mask(name).dtype
        assert torch.equal(t.get_mask(name), s.get_mask(name))
        assert t.is_squashed(name) == s.is_squashed(name)
        if include_data:
            assert torch.equal(
                t.get_data(name, return_original=False), s.get_data(name, return_original=False)
            )
    second = t.state_dict(include_data=include_data)
    for key in sd:
        if key not in ("state", "data"):
            assert second[key] == sd[key]
    for name in sd["state"]:
        assert torch.equal(second["state"][name]["mask"], sd["state"][name]["mask"])
