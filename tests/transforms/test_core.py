"""SparsifyTransform: policies, mask_over modes, batch structures, state, memory."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import warnings
from collections import OrderedDict, UserDict, namedtuple
from collections.abc import MutableMapping

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesparse import CorruptStateError, DataNormSparsifier, ThresholdSparsifier
from pipesparse.sparsifiers.norm import norm_keep_mask
from pipesparse.transforms import SparsifyTransform, UnsupportedContainerWarning

Pair = namedtuple("Pair", ["x", "y"])


class Encoding(UserDict):
    """Stands in for transformers' BatchEncoding: a UserDict with extra attributes."""

    def __init__(self, data=None, n_sequences=None):
        super().__init__(data)
        self.n_sequences = n_sequences


def norm(level=0.5, block=(1, 4)):
    return DataNormSparsifier(sparsity_level=level, sparse_block_shape=block)


def expected_batch(x, level=0.5, block=(1, 4)):
    return x * norm_keep_mask(x, level, block, None, "L1")


def expected_features(x, mask_from, level=0.5, block=(1, 4)):
    summary = mask_from.abs().mean(dim=0, keepdim=True)
    return x * norm_keep_mask(summary, level, block, None, "L1")


# -- every_batch ------------------------------------------------------------------------------
def test_every_batch_masks_each_batch_with_its_own_mask():
    transform = SparsifyTransform(norm())
    for seed in range(3):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(transform(x), expected_batch(x))
    assert transform.mask_over == "batch"


def test_every_batch_matches_torch_ao_reference():
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as Ref

    transform = SparsifyTransform(norm(0.5, (2, 2)))
    for seed in range(3):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
        ref = Ref(sparsity_level=0.5, sparse_block_shape=(2, 2))
        ref.add_data("batch", x.clone())
        ref.step()
        assert torch.equal(transform(x), x * ref.get_mask("batch"))


def test_every_batch_reregistering_is_a_dict_update_and_a_smaller_batch_works():
    sparsifier = norm()
    transform = SparsifyTransform(sparsifier)
    transform(torch.randn(8, 8))
    mask = sparsifier.get_mask("batch")
    transform(torch.randn(8, 8))
    assert sparsifier.get_mask("batch") is mask  # same mask object: the add_data fast path
    last = torch.randn(3, 8)
    assert torch.equal(transform(last), expected_batch(last))


def test_every_batch_features_mode_uses_per_feature_summary():
    transform = SparsifyTransform(norm(), mask_over="features")
    x = torch.randn(5, 8)
    out = transform(x)
    assert torch.equal(out, expected_features(x, x))
    assert transform.sparsifier.get_mask("batch").shape == (1, 8)
    assert (out == 0).all(dim=0).sum() == 4  # whole feature columns are dropped


# -- frozen -------------------------------------------------------------------------------
def test_frozen_fits_on_the_calibration_batch_and_keeps_the_mask():
    transform = SparsifyTransform(norm(), update="frozen")
    calibration = torch.randn(16, 8)
    transform(calibration)
    for n in (16, 3, 1):  # any batch size, the last batch smaller
        x = torch.randn(n, 8)
        assert torch.equal(transform(x), expected_features(x, calibration))


def test_frozen_batch_mask_meeting_another_shape_is_a_clear_value_error():
    transform = SparsifyTransform(norm(), update="frozen", mask_over="batch")
    calibration = torch.randn(4, 8)
    transform(calibration)
    x = torch.randn(4, 8)
    assert torch.equal(transform(x), x * norm_keep_mask(calibration, 0.5, (1, 4), None, "L1"))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(3, 8\).*mask_over='features'"):
        transform(torch.randn(3, 8))


def test_features_mask_meeting_other_features_is_a_value_error():
    transform = SparsifyTransform(norm(), update="frozen")
    transform(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"features of shape \(8,\).*\(4, 12\)"):
        transform(torch.randn(4, 12))
    assert transform.state_dict()["batches_seen"] == 1  # the bad batch was not counted


@pytest.mark.parametrize("mask_over, bad_b", [("batch", (5, 8)), ("features", (4, 12))])
def test_apply_in_place_refused_for_one_entry_writes_no_other_entry(mask_over, bad_b):
    transform = SparsifyTransform(norm(), update="frozen", mask_over=mask_over)
    transform({"a": torch.randn(4, 8), "b": torch.randn(4, 8)})
    a, b = torch.randn(4, 8), torch.randn(*bad_b)
    a_before, b_before = a.clone(), b.clone()
    with pytest.raises(ValueError, match="'batch_b'"):
        transform.apply_in_place({"a": a, "b": b})
    assert torch.equal(a, a_before) and torch.equal(b, b_before)  # the batch as it was


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int64, torch.uint16, torch.uint32, torch.float8_e4m3fn]
)
def test_features_of_any_real_dtype_are_ranked_by_their_true_magnitude(update, dtype):
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    x = torch.ones(4, 8, dtype=torch.float64)
    x[:, :4] = torch.tensor([[info.min], [info.max]]).repeat(2, 4)  # features 0-3 are large;
    x = x.to(dtype)  # for int8 |-128| is 128, though int8's abs() gives -128 back
    transform = SparsifyTransform(norm(), keys="x", update=update, mask_over="features")
    out = transform({"x": x})["x"]
    assert out.dtype == dtype
    assert torch.equal(
        transform.sparsifier.get_mask("batch"), torch.tensor([[1.0] * 4 + [0.0] * 4])
    )
    assert torch.equal(out.float()[:, :4], x.float()[:, :4]) and (out.float()[:, 4:] == 0).all()


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_a_bool_entry_is_masked_over_features_by_its_share_of_true(update):
    flags = torch.zeros(4, 8, dtype=torch.bool)
    flags[:, 4:] = True  # features 4-7 are always True: their mean |x| is 1, the others' 0
    transform = SparsifyTransform(norm(), keys="flags", update=update, mask_over="features")
    out = transform({"flags": flags})["flags"]
    assert out.dtype == torch.bool and torch.equal(out, flags)  # the True features are kept
    assert torch.equal(
        transform.sparsifier.get_mask("batch"), torch.tensor([[0.0] * 4 + [1.0] * 4])
    )


@pytest.mark.parametrize("sparsifier", [norm(), ThresholdSparsifier(threshold=0.5)])
def test_an_empty_batch_never_fits_a_persistent_features_mask(sparsifier):
    transform = SparsifyTransform(sparsifier, update="frozen")
    with pytest.raises(ValueError, match=r"no rows.*\(0, 8\)"):
        transform(torch.randn(0, 8))  # mean |x| over 0 rows is NaN: no mask to freeze
    assert not transform.is_fitted() and transform.state_dict()["batches_seen"] == 0
    calibration = torch.cat([torch.zeros(4, 4), torch.ones(4, 4)], dim=1)
    transform(calibration)
    mask = transform.sparsifier.get_mask("batch").clone()
    with pytest.raises(ValueError, match="no rows"):
        transform.fit(torch.randn(0, 8))
    assert torch.equal(transform.sparsifier.get_mask("batch"), mask)

    every_2 = SparsifyTransform(copy.deepcopy(sparsifier), update=2)
    every_2(calibration)
    every_2(calibration)
    assert every_2(torch.randn(0, 8)).shape == (0, 8)  # batch 2 refits, but not on 0 rows
    assert torch.equal(every_2.sparsifier.get_mask("batch"), mask)
    x = torch.rand(3, 8) + 1
    assert torch.equal(every_2(x), x * mask)


@pytest.mark.parametrize("update", ["every_batch", "frozen", 2])
@pytest.mark.parametrize("mask_over", ["batch", "features"])
def test_apply_in_place_masks_an_expanded_entry_out_of_place(update, mask_over):
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    transform = SparsifyTransform(norm(), update=update, mask_over=mask_over)
    want = transform._without_batches()({"x": row.expand(4, 8).clone(), "y": torch.ones(4, 8)})
    expanded = row.expand(4, 8)  # its rows are one memory: torch cannot write it in place
    got = transform.apply_in_place({"x": expanded, "y": torch.ones(4, 8)})
    assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])
    assert torch.equal(row, expanded[:1]) and transform.state_dict()["batches_seen"] == 1


@pytest.mark.parametrize("update", ["every_batch", "frozen", 2])
@pytest.mark.parametrize("mask_over", ["batch", "features"])
def test_a_transform_used_under_inference_mode_works_outside_it(update, mask_over):
    gen = torch.Generator().manual_seed(4)
    sizes = (4, 3, 4, 3, 4) if mask_over == "features" or update == "every_batch" else (4,) * 5
    batches = [torch.randn(n, 8, generator=gen) for n in sizes]
    reference = SparsifyTransform(norm(), update=update, mask_over=mask_over)
    want = [reference(x) for x in batches]
    transform = SparsifyTransform(norm(), update=update, mask_over=mask_over)
    with torch.inference_mode():  # an evaluation loop, before training
        assert torch.equal(transform(batches[0]), want[0])
    for x, expected in zip(batches[1:], want[1:], strict=True):
        assert torch.equal(transform(x), expected)
    with torch.inference_mode():
        state = copy.deepcopy(transform.state_dict())
        transform.load_state_dict(state)
        inference_batch = batches[4].clone()  # an inference tensor
    transform.fit(batches[4])
    expected = transform._without_batches()(batches[4])
    got = transform.apply_in_place(inference_batch)  # cannot be written here: out of place
    assert torch.equal(got, expected) and torch.equal(inference_batch, batches[4])
    assert not any(transform.sparsifier.get_mask(n).is_inference() for n in ["batch"])


class RefusesNaN(ThresholdSparsifier):
    """A user's rule that raises in its step, after the names before it got their masks."""

    def update_mask(self, name, data, **config):
        if data.isnan().any():
            raise ValueError(f"{name!r} holds NaN")
        super().update_mask(name, data, **config)


@pytest.mark.parametrize("mask_over", ["batch", "features"])
def test_a_fit_that_raises_in_the_step_leaves_every_persistent_mask_as_it_was(mask_over):
    gen = torch.Generator().manual_seed(8)
    clean = [{k: torch.randn(4, 8, generator=gen) for k in "ab"} for _ in range(3)]
    poisoned = {"a": clean[0]["a"] + 1, "b": clean[0]["b"].clone()}
    poisoned["b"][0, 0] = torch.nan
    frozen = SparsifyTransform(RefusesNaN(threshold=0.5), update="frozen", mask_over=mask_over)
    with pytest.raises(ValueError, match="'batch_b' holds NaN"):
        frozen(poisoned)  # batch_a was registered and stepped, batch_b registered, then this
    assert not frozen.is_fitted(["batch_a"]) and not frozen.is_fitted(["batch_b"])
    reference = SparsifyTransform(RefusesNaN(threshold=0.5), update="frozen", mask_over=mask_over)
    for batch in clean:  # fitted on the first batch that went through, as if it were the first
        got, want = frozen(batch), reference(batch)
        assert all(torch.equal(got[k], want[k]) for k in "ab")

    every_2 = SparsifyTransform(RefusesNaN(threshold=0.5), update=2, mask_over=mask_over)
    every_2(clean[0])
    every_2(clean[1])
    masks = {n: every_2.sparsifier.get_mask(n).clone() for n in ("batch_a", "batch_b")}
    with pytest.raises(ValueError, match="holds NaN"):
        every_2(poisoned)  # batch 2: a refit
    for name, mask in masks.items():
        assert torch.equal(every_2.sparsifier.get_mask(name), mask)
    assert every_2.state_dict()["batches_seen"] == 2


def test_scalar_entry_with_features_mode_is_a_value_error():
    with pytest.raises(ValueError, match="batch dim"):
        SparsifyTransform(norm(), update="frozen")(torch.tensor(1.0))


def test_fit_recalibrates_a_frozen_transform_in_place():
    transform = SparsifyTransform(norm(), update="frozen")
    transform(torch.randn(4, 8))
    mask = transform.sparsifier.get_mask("batch")
    pointer = mask.data_ptr()
    new = torch.cat([torch.zeros(4, 4), torch.ones(4, 4)], dim=1)
    transform.fit(new)
    assert mask.data_ptr() == pointer  # same storage: shared memory stays shared
    assert torch.equal(mask, torch.tensor([[0.0] * 4 + [1.0] * 4]))
    with pytest.raises(ValueError, match="floating"):
        transform.fit({"ids": torch.arange(3)})


def test_changing_the_level_and_stepping_the_sparsifier_refits_in_place():
    """What a scheduler does: change the config, step() on the attached calibration summary."""
    transform = SparsifyTransform(norm(0.25, (1, 1)), update="frozen")
    calibration = torch.arange(1.0, 9.0).repeat(2, 1)
    transform(calibration)
    mask = transform.sparsifier.get_mask("batch")
    assert int(mask.sum()) == 6
    transform.sparsifier.data_groups["batch"]["sparsity_level"] = 0.75
    transform.sparsifier.step()
    assert transform.sparsifier.get_mask("batch") is mask and int(mask.sum()) == 2
    assert torch.equal(transform(calibration)[0], torch.tensor([0.0] * 6 + [7.0, 8.0]))


# -- every N ------------------------------------------------------------------------------
def test_every_n_refits_on_batches_0_n_2n():
    transform = SparsifyTransform(norm(), update=3)
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    for i, x in enumerate(batches):
        fitted_on = batches[i - i % 3]
        assert torch.equal(transform(x), expected_features(x, fitted_on)), i
    assert transform.state_dict()["batches_seen"] == 7


def test_every_n_resumes_its_schedule_from_the_state_dict():
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    straight = SparsifyTransform(norm(), update=3)
    expected = [straight(x) for x in batches]
    first = SparsifyTransform(norm(), update=3)
    for x in batches[:4]:
        first(x)
    resumed = SparsifyTransform(norm(), update=3)
    resumed.load_state_dict(first.state_dict())
    for x, want in zip(batches[4:], expected[4:], strict=True):
        assert torch.equal(resumed(x), want)


# -- batch structures -----------------------------------------------------------------------
def test_dict_batch_masks_float_entries_and_passes_the_rest_through():
    transform = SparsifyTransform(norm())
    batch = {
        "x": torch.randn(4, 8),
        "label": torch.arange(4),
        "id": ["a", "b", "c", "d"],
        "weight": 3,
    }
    out = transform(batch)
    assert type(out) is dict and list(out) == list(batch)
    assert torch.equal(out["x"], expected_batch(batch["x"]))
    for key in ("label", "id", "weight"):
        assert out[key] is batch[key]
    assert list(transform.sparsifier.data_groups) == ["batch"]


def test_several_entries_get_one_mask_each_named_by_key_or_index():
    transform = SparsifyTransform(norm())
    a, b = torch.randn(4, 8), torch.randn(2, 4)
    out = transform({"a": a, "b": b})
    assert sorted(transform.sparsifier.data_groups) == ["batch_a", "batch_b"]
    assert torch.equal(out["a"], expected_batch(a)) and torch.equal(out["b"], expected_batch(b))
    tuple_transform = SparsifyTransform(norm(), name="t")
    out = tuple_transform((a, torch.arange(2), b))
    assert isinstance(out, tuple) and torch.equal(out[2], expected_batch(b))
    assert sorted(tuple_transform.sparsifier.data_groups) == ["t_0", "t_2"]


@pytest.mark.parametrize("update", ["frozen", 3])
@pytest.mark.parametrize("in_place", [False, True])
def test_an_entry_new_to_a_persistent_transform_is_fitted_alone(update, in_place):
    left = torch.cat([torch.zeros(4, 4), torch.ones(4, 4)], dim=1)  # keeps features 4-7
    right = left.flip(1)  # keeps features 0-3
    transform = SparsifyTransform(norm(), update=update)
    transform({"x": left, "y": right})
    call = transform.apply_in_place if in_place else transform
    out = call({"x": right.clone(), "y": left.clone(), "z": right.clone()})
    masks = {n: transform.sparsifier.get_mask(f"batch_{n}") for n in "xyz"}
    assert torch.equal(masks["x"], left[:1]) and torch.equal(masks["y"], right[:1])  # kept
    assert torch.equal(masks["z"], right[:1])  # fitted on the batch that brought it
    assert torch.equal(out["x"], torch.zeros(4, 8)) and torch.equal(out["z"], right)
    assert all(mask.is_shared() for mask in masks.values())


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_entries_whose_names_would_be_alike_get_masks_of_their_own(update):
    a, b, c = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    transform = SparsifyTransform(norm(), update=update, mask_over="batch")
    out = transform({"x_0": a, "x": [b], "y.z": c})
    assert list(transform.sparsifier.data_groups) == ["batch_x_0", "batch_x_0_1", "batch_y_z"]
    for got, data in ((out["x_0"], a), (out["x"][0], b), (out["y.z"], c)):
        assert torch.equal(got, expected_batch(data))
    out = SparsifyTransform(norm())({"0": a, 0: b})
    assert torch.equal(out["0"], expected_batch(a)) and torch.equal(out[0], expected_batch(b))


@dataclasses.dataclass
class Features:
    x: torch.Tensor
    ids: torch.Tensor
    label: str = "cat"


def test_dataclass_batches_are_walked_and_rebuilt():
    x, ids = torch.randn(4, 8), torch.arange(4)
    batch = Features(x, ids)
    for transform in (SparsifyTransform(norm()), SparsifyTransform(norm(), keys="x")):
        out = transform(batch)
        assert type(out) is Features and out.ids is ids and out.label == "cat"
        assert torch.equal(out.x, expected_batch(x)) and batch.x is x
    with pytest.raises(KeyError, match=r"no entry 'y'.*\['x', 'ids', 'label'\]"):
        SparsifyTransform(norm(), keys="y")(batch)


class Entries(MutableMapping):
    """A mapping without __copy__ whose entries live in an inner dict: copy.copy shares it."""

    def __init__(self, **entries):
        self._entries = dict(entries)

    def __getitem__(self, key):
        return self._entries[key]

    def __setitem__(self, key, value):
        self._entries[key] = value

    def __delitem__(self, key):
        del self._entries[key]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def test_a_mapping_whose_copy_shares_its_entries_is_not_changed():
    x = torch.randn(4, 8)
    batch = Entries(x=x, id=3)
    out = SparsifyTransform(norm())(batch)
    assert type(out) is Entries and out is not batch
    assert batch["x"] is x and torch.equal(out["x"], expected_batch(x)) and out["id"] == 3


def test_a_sparse_batch_is_a_type_error():
    with pytest.raises(TypeError, match="layout torch.sparse_coo; accepted: dense"):
        SparsifyTransform(norm())(torch.randn(4, 8).to_sparse())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_a_nested_tensor_entry_is_a_type_error_and_fits_nothing(update):
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])  # strided layout
    transform = SparsifyTransform(norm(), update=update)
    with pytest.raises(TypeError, match=r"nested tensor.*to_padded_tensor"):
        transform({"a": torch.randn(4, 8), "b": nested})
    assert not transform.sparsifier.data_groups


def as_worker(transform):
    """The transform as a worker process that shares its masks sees it."""
    transform._version._writer = -1
    return transform


def test_a_worker_process_applies_shared_masks_and_never_writes_them():
    transform = SparsifyTransform(norm(), update=2)
    transform.fit(torch.randn(4, 8))
    mask, state = transform.sparsifier.get_mask("batch").clone(), transform.state_dict()
    as_worker(transform)
    for _ in range(3):  # update=2 would refit the second batch in the owner
        transform(torch.randn(4, 8))
    assert torch.equal(transform.sparsifier.get_mask("batch"), mask)
    for action in (
        lambda: transform.fit(torch.randn(4, 8)),
        lambda: transform.load_state_dict(state),
    ):
        with pytest.raises(ValueError, match="in a worker process .* would rewrite the masks"):
            action()
    with pytest.raises(ValueError, match="no mask for .* in this worker process"):
        as_worker(SparsifyTransform(norm(), update="frozen"))(torch.randn(4, 8))


def test_a_worker_reads_every_mask_of_a_batch_at_once():
    """Entries of one batch are masked by one fit even if the owner refits meanwhile: their
    masks are read under one check of the sequence counter, not one each."""
    transform = SparsifyTransform(norm(), update="frozen")
    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 8)}
    transform.fit(batch)
    reads = []
    version = as_worker(transform)._version
    read = version.read
    version.read = lambda fn: reads.append(1) or read(fn)
    for apply in (transform, transform.apply_in_place):
        reads.clear()
        out = apply({k: v.clone() for k, v in batch.items()})
        assert len(reads) == 1 and torch.equal(out["y"], expected_features(batch["y"], batch["y"]))


def test_copies_of_a_persistent_transform_share_their_masks_and_old_pickles_load():
    transform = SparsifyTransform(norm(), update="frozen")
    transform.fit(torch.randn(4, 8))
    copied = copy.deepcopy(transform)
    assert copied.sparsifier.get_mask("batch").is_shared() and not copied._version.elsewhere
    del transform.__dict__["_version"]  # as a transform pickled before it had one
    loaded = pickle.loads(pickle.dumps(transform))
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), copied(x)) and not loaded._version.elsewhere


def test_keys_select_entries():
    transform = SparsifyTransform(norm(), keys=["x"])
    batch = {"x": torch.randn(4, 8), "y": torch.randn(4, 8)}
    out = transform(batch)
    assert torch.equal(out["x"], expected_batch(batch["x"])) and out["y"] is batch["y"]
    assert list(transform.sparsifier.data_groups) == ["batch"]
    by_index = SparsifyTransform(norm(), keys=1)
    pair = [torch.randn(4, 8), torch.randn(4, 8)]
    out = by_index(pair)
    assert isinstance(out, list) and out[0] is pair[0]
    assert torch.equal(out[1], expected_batch(pair[1]))


def test_a_negative_index_selects_from_the_end_and_an_entry_selected_twice_is_refused():
    x = torch.randn(4, 8)
    out = SparsifyTransform(norm(), keys=-1)((torch.arange(4), x))
    assert torch.equal(out[1], expected_batch(x))
    with pytest.raises(ValueError, match="selects entry 1 twice"):
        SparsifyTransform(norm(), keys=[1, -1])([torch.arange(4), x])
    with pytest.raises(ValueError, match="selects entry 'x' twice"):
        SparsifyTransform(norm(), keys=["x", "x"])({"x": x})


def test_keys_errors_name_the_key():
    with pytest.raises(KeyError, match=r"no entry 'z'.*\['x'\]"):
        SparsifyTransform(norm(), keys="z")({"x": torch.randn(2, 4)})
    with pytest.raises(TypeError, match="label.*list"):
        SparsifyTransform(norm(), keys="label")({"label": [1, 2]})
    with pytest.raises(TypeError, match="Tensor"):
        SparsifyTransform(norm(), keys="x")(torch.randn(2, 4))


def test_namedtuple_nested_ordered_and_userdict_batches_keep_their_types():
    transform = SparsifyTransform(norm())
    x = torch.randn(4, 8)
    out = transform(Pair(x, torch.arange(4)))
    assert type(out) is Pair and torch.equal(out.x, expected_batch(x))
    nested = {"inputs": [{"x": x, "mask": torch.ones(4, dtype=torch.bool)}], "meta": ("a",)}
    out = transform(nested)
    assert torch.equal(out["inputs"][0]["x"], expected_batch(x))
    assert out["meta"] is nested["meta"]
    assert out["inputs"][0]["mask"] is nested["inputs"][0]["mask"]
    ordered = transform(OrderedDict(x=x, y=torch.arange(4)))
    assert type(ordered) is OrderedDict and list(ordered) == ["x", "y"]
    encoding = Encoding({"input_ids": torch.arange(8).view(2, 4), "x": x}, n_sequences=1)
    out = transform(encoding)
    assert type(out) is Encoding and out.n_sequences == 1
    assert out["input_ids"] is encoding["input_ids"] and torch.equal(out["x"], expected_batch(x))
    assert torch.equal(encoding["x"], x)  # the input batch is not modified


def test_batch_without_float_entries_is_returned_as_is():
    transform = SparsifyTransform(norm())
    batch = {"ids": torch.arange(3), "text": ["a"]}
    assert transform(batch) is batch
    ids = torch.arange(8)  # a bare tensor batch too
    assert transform(ids) is ids and transform.apply_in_place(ids) is ids


def test_numpy_entries_stay_numpy_unless_asked():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    out = SparsifyTransform(norm())({"x": x, "y": np.arange(4)})
    assert isinstance(out["x"], np.ndarray) and out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], expected_batch(torch.from_numpy(x)).numpy())
    read_only = x.copy()
    read_only.flags.writeable = False
    as_torch = SparsifyTransform(norm(), numpy_to_torch=True)(read_only)
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(out["x"]))
    flipped = np.flip(x, 1)  # negative strides, which torch.from_numpy refuses
    np.testing.assert_array_equal(
        SparsifyTransform(norm())(flipped), expected_batch(torch.from_numpy(flipped.copy())).numpy()
    )


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_big_endian_numpy_entries_are_masked_and_keep_their_dtype(update):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(">f4")  # e.g. read from a file
    transform = SparsifyTransform(norm(), update=update)
    expected = transform._without_batches()(x.astype(np.float32))
    for out in (transform({"x": x})["x"], transform.apply_in_place({"x": x.copy()})["x"]):
        assert isinstance(out, np.ndarray) and out.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(out, expected)
    as_torch = SparsifyTransform(norm(), numpy_to_torch=True)(x)
    assert torch.equal(as_torch, expected_batch(torch.from_numpy(x.astype(np.float32))))


def test_explicitly_selected_integer_and_half_entries_keep_their_dtype():
    ints = torch.arange(32).view(4, 8) - 16
    out = SparsifyTransform(norm(), keys="x")({"x": ints})
    assert out["x"].dtype == torch.int64
    assert torch.equal(out["x"], ints * norm_keep_mask(ints, 0.5, (1, 4), None, "L1"))
    half = torch.randn(4, 8).half()
    out = SparsifyTransform(norm(), update="frozen")(half)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("update", ["frozen", 2])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_entries_stay_exact_under_a_features_mask(update, dtype):
    big = 2**40 if dtype == torch.int64 else 2**24
    ids = (torch.arange(8, dtype=dtype) * 2 + big + 1).repeat(4, 1)
    ids[:, 4:] = 1  # the lower half of the features: dropped
    transform = SparsifyTransform(norm(), keys="ids", update=update)
    for out in (transform({"ids": ids}), transform.apply_in_place({"ids": ids.clone()})):
        assert out["ids"].dtype == dtype
        assert torch.equal(out["ids"][:, :4], ids[:, :4]) and (out["ids"][:, 4:] == 0).all()


@pytest.mark.parametrize(
    "mask_over, bad_y, error, match",
    [
        ("features", torch.tensor(1.0), ValueError, "'batch_y' is a scalar"),
        ("batch", torch.randn(4, 8, dtype=torch.complex64), TypeError, "'batch_y' has dtype"),
    ],
)
def test_a_failed_fit_leaves_every_mask_as_it_was(mask_over, bad_y, error, match):
    transform = SparsifyTransform(norm(), keys=["x", "y"], update="frozen", mask_over=mask_over)
    transform.fit({"x": torch.randn(4, 8), "y": torch.randn(4, 8)})
    before = {n: transform.sparsifier.get_mask(n).clone() for n in ("batch_x", "batch_y")}
    with pytest.raises(error, match=match):
        transform.fit({"x": torch.randn(4, 8) + 1, "y": bad_y})
    for name, mask in before.items():
        assert torch.equal(transform.sparsifier.get_mask(name), mask)
        assert transform.sparsifier.get_mask(name).is_shared()


# -- device -------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback without CUDA")
def test_cuda_without_cuda_warns_once_and_stays_on_cpu():
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        transform = SparsifyTransform(norm(), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            x = torch.randn(4, 8)
            out = transform(x)
            assert out.device.type == "cpu" and torch.equal(out, expected_batch(x))


def test_device_cpu_and_bad_device():
    out = SparsifyTransform(norm(), device="cpu")(torch.randn(4, 8))
    assert out.device.type == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        SparsifyTransform(norm(), device="gpu9")


# -- constructor validation ---------------------------------------------------------------
@pytest.mark.parametrize("update", [0, -2, 1.5, True, "sometimes", None])
def test_bad_update_policy_names_value_and_accepted(update):
    with pytest.raises(ValueError, match=r"update=.*'every_batch', 'frozen', or an int N"):
        SparsifyTransform(norm(), update=update)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_over": "rows"}, "mask_over='rows'.*'batch', 'features'"),
        ({"name": "a.b"}, "name='a.b'"),
        ({"name": ""}, "name=''"),
        ({"keys": []}, r"keys=\(\)"),
        ({"keys": [1.5]}, r"keys=\(1.5,\)"),
        ({"numpy_to_torch": "yes"}, "numpy_to_torch"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsifyTransform(norm(), **kwargs)


def test_name_must_be_a_str():
    with pytest.raises(TypeError, match="name must be a str, got int"):
        SparsifyTransform(norm(), name=3)


def test_sparsifier_must_be_a_data_sparsifier():
    with pytest.raises(TypeError, match="BaseDataSparsifier, got dict"):
        SparsifyTransform({})


def test_default_mask_over_follows_the_policy():
    assert SparsifyTransform(norm()).mask_over == "batch"
    assert SparsifyTransform(norm(), update="frozen").mask_over == "features"
    assert SparsifyTransform(norm(), update=5).mask_over == "features"
    assert SparsifyTransform(norm(), update=5, mask_over="batch").mask_over == "batch"


# -- state --------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 10),
    level=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    update=st.sampled_from(["frozen", 2]),
)
def test_state_dict_round_trip_gives_the_same_outputs(rows, cols, level, seed, update):
    gen = torch.Generator().manual_seed(seed)
    calibration, x = torch.randn(rows, cols, generator=gen), torch.randn(3, cols, generator=gen)
    source = SparsifyTransform(ThresholdSparsifier(threshold=level), update=update)
    source(calibration)
    copy = SparsifyTransform(ThresholdSparsifier(threshold=0.0), update=update)
    copy.load_state_dict(source.state_dict())
    assert torch.equal(copy(x), source(x))
    assert copy.state_dict()["batches_seen"] == source.state_dict()["batches_seen"]


def test_state_dict_has_named_keys_and_no_data():
    transform = SparsifyTransform(norm(), update=4)
    transform(torch.randn(4, 8))
    state = transform.state_dict()
    assert set(state) == {"format", "config", "batches_seen", "sparsifier"}
    assert state["config"] == {"name": "batch", "update": 4, "mask_over": "features"}
    assert "data" not in state["sparsifier"]
    assert state["sparsifier"]["state"]["batch"]["mask"].dtype == torch.bool


def good_state():
    transform = SparsifyTransform(norm(), update="frozen")
    transform(torch.randn(4, 8))
    return transform.state_dict()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda s: [1, 2], "must be a dict"),
        (lambda s: {**s, "format": "other/9"}, "format 'other/9'"),
        (lambda s: {k: v for k, v in s.items() if k != "config"}, "config"),
        (lambda s: {**s, "config": {**s["config"], "name": "other"}}, "name='other'"),
        (lambda s: {**s, "config": {**s["config"], "mask_over": "batch"}}, "mask_over='batch'"),
        (lambda s: {**s, "batches_seen": -1}, "batches_seen"),
        (lambda s: {**s, "batches_seen": "3"}, "batches_seen"),
        (lambda s: {**s, "sparsifier": None}, "sparsifier"),
        (lambda s: {**s, "sparsifier": {**s["sparsifier"], "state": 7}}, "state"),
    ],
)
def test_corrupt_state_is_rejected_and_leaves_the_transform_intact(corrupt, match):
    transform = SparsifyTransform(norm(), update="frozen")
    transform(torch.randn(4, 8))
    x = torch.randn(3, 8)
    before, seen = transform(x), transform.state_dict()["batches_seen"]
    with pytest.raises(CorruptStateError, match=match):
        transform.load_state_dict(corrupt(good_state()))
    assert torch.equal(transform(x), before)
    assert transform.state_dict()["batches_seen"] == seen + 1


def test_persistent_masks_are_shared_and_loading_copies_in_place():
    transform = SparsifyTransform(norm(), update="frozen")
    transform(torch.randn(4, 8))
    mask = transform.sparsifier.get_mask("batch")
    assert mask.is_shared()
    pointer = mask.data_ptr()
    transform.load_state_dict(good_state())
    assert transform.sparsifier.get_mask("batch").data_ptr() == pointer
    loaded = SparsifyTransform(norm(), update="frozen")
    loaded.load_state_dict(good_state())
    assert loaded.sparsifier.get_mask("batch").is_shared()
    assert not SparsifyTransform(norm()).persistent


# -- memory -------------------------------------------------------------------------------
def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance wakes deprecated lazy torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("update", ["every_batch", "frozen", 7])
def test_memory_is_flat_over_10000_batches(update):
    """No per-batch object is retained: live tensors and gc-tracked objects stay the same."""
    transform = SparsifyTransform(norm(), update=update)
    batch = {"x": torch.randn(4, 8), "y": torch.arange(4)}
    for _ in range(100):
        transform(batch)
    tensors, objects = live_tensors(), len(gc.get_objects())
    for _ in range(10_000):
        transform(batch)
    assert live_tensors() == tensors
    assert len(gc.get_objects()) - objects < 50  # flat: no growth with the number of batches


class _Holder:
    """A batch class the transform does not look into (not a Mapping, sequence or dataclass)."""

    def __init__(self, x):
        self.x = x


class _SlottedHolder:
    """A class with ``__slots__`` (as ``attrs.define`` makes): no ``__dict__``."""

    __slots__ = ("__x",)

    def __init__(self, x):
        self.__x = x


class _SlottedChild(_SlottedHolder):
    __slots__ = ("label",)

    def __init__(self, x):
        super().__init__(torch.arange(3))
        self.label = x


def _unsupported_batches():
    from collections import deque

    x = torch.randn(4, 8)
    return [
        ("collections.deque", deque([x])),
        ("frozenset", frozenset([x])),
        ("collections.UserList", __import__("collections").UserList([x])),
        (f"{__name__}._Holder", _Holder(x)),
        (f"{__name__}._Holder", _Holder({"x": np.ones((4, 8), np.float32)})),
        ("collections.deque", {"y": torch.arange(4), "more": deque([x])}),  # nested
        # slotted objects (attrs.define's default) had no attributes to look at: no warning
        (f"{__name__}._SlottedHolder", _SlottedHolder(x)),
        (f"{__name__}._SlottedChild", _SlottedChild(x)),
    ]


@pytest.mark.parametrize(("type_name", "batch"), _unsupported_batches())
def test_keys_none_warns_once_per_type_about_floats_it_cannot_reach(type_name, batch):
    """A deque, set or object of another class came back with its tensors unmasked, silently."""
    tf = SparsifyTransform(norm())
    with pytest.warns(UnsupportedContainerWarning, match=type_name) as record:
        assert tf(batch) is batch
    assert len(record) == 1
    assert "unmasked" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf(batch)  # once per transform and type
        pickle.loads(pickle.dumps(tf))(batch)  # a worker's copy knows it warned (picklable)
    with pytest.warns(UnsupportedContainerWarning, match=type_name):
        SparsifyTransform(norm())(batch)  # another transform warns again


def test_keys_none_warns_next_to_floats_it_masks():
    from collections import deque

    x, hidden = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.warns(UnsupportedContainerWarning, match="collections.deque"):
        out = SparsifyTransform(norm())({"x": x, "extra": deque([hidden])})
    assert torch.equal(out["x"], expected_batch(x))
    assert out["extra"][0] is hidden


@pytest.mark.parametrize(
    "batch",
    [
        {"ids": torch.arange(8), "label": 3},  # no float tensor: skipped on purpose
        {"x": torch.randn(4, 8), "y": np.int64(3), "tags": {"a", "b"}, "obj": _Holder("text")},
        (torch.randn(4, 8), _Holder(torch.arange(3))),  # an integer tensor out of reach
        _Holder(None),
        "text",
    ],
)
def test_keys_none_does_not_warn_without_unreachable_floats(batch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparsifyTransform(norm())(batch)


def test_fit_keys_none_names_the_container_it_cannot_look_into():
    from collections import deque

    with pytest.warns(UnsupportedContainerWarning, match="collections.deque"):
        with pytest.raises(ValueError, match="fit needs a batch"):
            SparsifyTransform(norm(), update="frozen").fit(deque([torch.randn(4, 8)]))


def test_dataloader_workers_warn_at_most_once_per_type(tmp_path):
    from collections import deque

    from torch.utils.data import DataLoader

    def collate(items):
        return deque([torch.stack(items)])

    def init(_):
        warnings.simplefilter("always")
        log = tmp_path / f"w{torch.utils.data.get_worker_info().id}.txt"

        def show(message, category, *args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{category.__name__}\n")

        warnings.showwarning = show

    tf = SparsifyTransform(norm())
    loader = DataLoader(
        [torch.randn(8) for _ in range(32)],
        batch_size=2,
        num_workers=2,
        collate_fn=lambda items: tf(collate(items)),
        worker_init_fn=init,
        multiprocessing_context="fork",
        timeout=60,
    )
    assert len(list(loader)) == 16
    logs = sorted(p.read_text() for p in tmp_path.glob("w*.txt"))
    assert logs == ["UnsupportedContainerWarning\n"] * 2


def test_keys_none_looks_into_each_unsupported_type_once(monkeypatch):
    """A batch carrying many objects of a class (records, images) costs one look per type, in
    the first batch, not one per object in every batch."""
    from pipesparse.transforms import _structure

    looked = []
    real = _structure.holds_float_array
    monkeypatch.setattr(
        _structure, "holds_float_array", lambda node: looked.append(node) or real(node)
    )
    tf = SparsifyTransform(norm())
    batch = {"x": torch.randn(4, 8), "meta": [_Holder(i) for i in range(256)], "tags": {"a"}}
    for _ in range(3):
        out = tf(batch)
    assert torch.equal(out["x"], expected_batch(batch["x"]))
    assert [type(node) for node in looked] == [_Holder, set]


def test_mask_names_follow_the_number_of_selected_entries_as_the_readme_says():
    torch.manual_seed(0)
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
    tf({"a": torch.randn(4, 8)})
    first = tf.sparsifier.get_mask("batch").clone()
    tf({"a": torch.randn(4, 8), "b": torch.randn(4, 8)})
    assert sorted(tf.sparsifier.data_groups) == ["batch", "batch_a", "batch_b"]
    assert torch.equal(tf.sparsifier.get_mask("batch"), first)
