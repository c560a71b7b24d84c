"""SparsifyCollate in a DataLoader: main process, fork and spawn workers, persistent workers,
and masks changed by the main process reaching workers that are already running."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyCollate, SparsifyTransform

CONTEXTS = ["fork", "spawn"]


def samples(n=16, features=8, seed=0):
    """A list is a map-style dataset that pickles into spawn workers as it is."""
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(features, generator=gen), "y": i, "id": f"s{i}"} for i in range(n)]


def transform(update="every_batch"):
    return SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update=update)


def loader(dataset, collate, **kwargs):
    kwargs.setdefault("batch_size", 4)
    if kwargs.get("num_workers", 0) > 0:
        kwargs.setdefault("timeout", 60)
    return DataLoader(dataset, collate_fn=collate, **kwargs)


def in_main_process(dataset, tf, batch_size=4):
    """The batches the main process itself emits for the same input."""
    return [
        tf(default_collate(dataset[i : i + batch_size])) for i in range(0, len(dataset), batch_size)
    ]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["id"] == b["id"]


def test_main_process_collates_then_sparsifies_and_passes_labels_through():
    data = samples(10)
    tf = transform()
    got = list(loader(data, SparsifyCollate(tf)))
    assert [len(b["id"]) for b in got] == [4, 4, 2]  # the smaller last batch works
    assert_same_batches(got, in_main_process(data, transform()))
    assert all((b["x"] == 0).float().mean() == 0.5 for b in got)


def test_custom_collate_fn():
    def stack_x(items):
        return torch.stack([item["x"] for item in items])

    data = samples(8)
    got = list(loader(data, SparsifyCollate(transform(), collate_fn=stack_x)))
    want = [transform()(stack_x(data[i : i + 4])) for i in (0, 4)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_collate_is_picklable_and_checks_its_arguments():
    collate = SparsifyCollate(transform("frozen"))
    collate([{"x": torch.randn(8)}] * 4)
    copy = pickle.loads(pickle.dumps(collate))
    batch = [{"x": torch.randn(8)}] * 3
    assert torch.equal(copy(batch)["x"], collate(batch)["x"])
    with pytest.raises(TypeError, match="SparsifyTransform, got function"):
        SparsifyCollate(default_collate)
    with pytest.raises(TypeError, match="callable"):
        SparsifyCollate(transform(), collate_fn=3)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_workers_emit_the_same_masked_batches_as_the_main_process(context, update):
    data = samples(16)
    tf = transform(update)
    if update == "frozen":
        tf(default_collate(samples(32, seed=1)))  # calibrate in the main process
    want = in_main_process(data, tf)
    got = list(loader(data, SparsifyCollate(tf), num_workers=2, multiprocessing_context=context))
    assert_same_batches(got, want)


def test_an_uncalibrated_frozen_transform_in_a_worker_asks_for_calibration():
    dl = loader(samples(8), SparsifyCollate(transform("frozen")), num_workers=1)
    with pytest.raises(ValueError, match=r"calibrate first.*transform\(calibration_batch\)"):
        next(iter(dl))


def test_every_n_in_workers_applies_the_main_process_mask_without_refitting():
    tf = transform(2)
    calibration = default_collate(samples(32, seed=1))
    tf(calibration)
    data = samples(16)
    frozen = transform("frozen")
    frozen(calibration)
    got = list(loader(data, SparsifyCollate(tf), num_workers=2, multiprocessing_context="fork"))
    assert_same_batches(got, in_main_process(data, frozen))


def masked_with(data, tf, mask_source):
    """Batches as masked by a frozen transform fitted on ``mask_source``."""
    reference = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
    reference.fit(mask_source)
    return in_main_process(data, reference)


@pytest.mark.parametrize(
    "context, change", [("fork", "load_state_dict"), ("spawn", "load_state_dict"), ("fork", "fit")]
)
def test_running_persistent_workers_use_a_mask_changed_by_the_main_process(context, change):
    data = samples(40)
    old_calibration = default_collate(samples(32, seed=1))["x"]
    new_calibration = -torch.flip(old_calibration, dims=[1])  # the mask mirrors
    tf = transform("frozen")
    tf.fit(old_calibration)
    old = masked_with(data, tf, old_calibration)
    new = masked_with(data, tf, new_calibration)
    assert not torch.equal(old[0]["x"], new[0]["x"])

    dl = loader(
        data,
        SparsifyCollate(tf),
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,
        prefetch_factor=1,
    )
    assert_same_batches(list(dl), old)  # epoch 1: the old mask everywhere
    it = iter(dl)  # epoch 2, same worker processes
    got = [next(it), next(it)]
    if change == "fit":
        tf.fit(new_calibration)
    else:
        source = transform("frozen")
        source.fit(new_calibration)
        tf.load_state_dict(source.state_dict())
    got.extend(it)
    # Batches 2 and 3 were already requested (2 workers x prefetch_factor 1); from batch 4 on
    # every batch is requested after the change and must use the new mask.
    assert_same_batches(got[:2], old[:2])
    for i in (2, 3):
        assert torch.equal(got[i]["x"], old[i]["x"]) or torch.equal(got[i]["x"], new[i]["x"])
    assert_same_batches(got[4:], new[4:])
