"""SparsifyCollate in a DataLoader: main process, fork and spawn workers, persistent workers,
and masks changed by the main process reaching workers that are already running."""

from __future__ import annotations

import math
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


def refit_in_worker(worker_id):
    torch.utils.data.get_worker_info().dataset.transform.fit(torch.randn(8, 8))


class WithTransform(torch.utils.data.Dataset):
    """A dataset holding the transform, so that worker_init_fn can reach it."""

    def __init__(self, transform):
        self.transform, self.data = transform, samples(8)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_worker_may_not_rewrite_the_masks_it_shares(context):
    tf = transform("frozen")
    tf.fit(default_collate(samples(32, seed=1))["x"])
    before = tf.sparsifier.get_mask("batch").clone()
    dl = loader(
        WithTransform(tf),
        SparsifyCollate(tf),
        num_workers=1,
        multiprocessing_context=context,
        worker_init_fn=refit_in_worker,
    )
    with pytest.raises(ValueError, match=r"fit in a worker process .* would rewrite the masks"):
        next(iter(dl))
    assert torch.equal(tf.sparsifier.get_mask("batch"), before)


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


def stacked(items):
    return torch.stack(items)


class Ones(torch.utils.data.Dataset):
    """Batches of ones: a masked batch is the mask it was multiplied by."""

    def __init__(self, length, features):
        self.length, self.features = length, features

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return torch.ones(self.features)


@pytest.mark.parametrize("change", ["fit", "load_state_dict"])
@pytest.mark.parametrize("collate", ["in_place", "out_of_place"])
def test_a_worker_never_masks_with_half_a_mask_the_main_process_is_writing(change, collate):
    """The main process refits after every batch while a worker masks big batches: each batch
    must come out masked by one of the two masks whole (before the sequence counter about one
    in twenty did not, some wholly zeroed)."""
    features = 1 << 20  # a write and a multiply long enough to overlap often
    left = torch.cat([torch.full((2, features // 2), 10.0), torch.ones(2, features // 2)], 1)
    tf = transform("frozen")
    states, masks = [], []
    for calibration in (left.flip(1), left):
        tf.fit(calibration)
        states.append(tf.state_dict())
        masks.append(tf.sparsifier.get_mask("batch").clone().float())
    if collate == "in_place":
        collate_fn = SparsifyCollate(tf)
    else:  # another collate_fn: the transform may not write into its batch
        collate_fn = SparsifyCollate(tf, collate_fn=stacked)
    dl = loader(Ones(120, features), collate_fn, batch_size=1, num_workers=1)
    torn = 0
    for i, batch in enumerate(dl):
        torn += not any(torch.equal(batch, mask) for mask in masks)
        if change == "fit":
            tf.fit(left if i % 2 else left.flip(1))
        else:
            tf.load_state_dict(states[i % 2])
    assert torn == 0


# -- in-place masking of default_collate's fresh batch -----------------------------------------


def out_of_place(tf, samples_):
    """What the transform returns for the same collated batch when it may not write into it."""
    return tf(default_collate(samples_))


@pytest.mark.parametrize(
    "update, mask_over", [("every_batch", "batch"), ("frozen", "features"), ("frozen", "batch")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_default_collate_batches_equal_the_out_of_place_transform(update, mask_over, dtype):
    data = [{**s, "x": s["x"].to(dtype), "w": s["x"].double()} for s in samples(12)]
    tf = SparsifyTransform(
        DataNormSparsifier(sparsity_level=0.5), update=update, mask_over=mask_over
    )
    if update == "frozen":
        tf(default_collate(data[:4]))
    collate = SparsifyCollate(tf)
    for start in (0, 4, 8):
        got = collate(data[start : start + 4])
        want = out_of_place(tf, data[start : start + 4])
        for key in ("x", "w"):
            assert got[key].dtype == want[key].dtype
            assert torch.equal(got[key], want[key])
            assert torch.equal(torch.signbit(got[key]), torch.signbit(want[key]))  # -0.0 too
        assert torch.equal(got["y"], want["y"]) and got["id"] == want["id"]
        assert (got["x"] == 0).any()


def test_default_collate_of_numpy_samples_and_an_explicit_default_collate():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(8, generator=gen).numpy() for _ in range(4)]
    tf = transform()
    want = tf(default_collate(rows))
    for collate in (SparsifyCollate(tf), SparsifyCollate(tf, collate_fn=default_collate)):
        got = collate(rows)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert all((row != 0).all() for row in rows)  # the samples themselves are never masked


def test_calling_the_transform_never_changes_the_callers_batch():
    batch = default_collate(samples(8))
    before = {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in batch.items()}
    for tf in (transform(), transform("frozen"), transform(2)):
        out = tf(batch)
        assert out["x"] is not batch["x"] and (out["x"] == 0).any()
        for key, value in before.items():
            assert torch.equal(batch[key], value) if key != "id" else batch[key] == value
    array = batch["x"].numpy().copy()
    out = transform()(array)
    assert isinstance(out, type(array)) and (out == 0).any() and (array != 0).all()


def test_apply_in_place_writes_into_the_batch_and_falls_back_where_it_cannot():
    tf = SparsifyTransform(  # over features, the mask of an int entry is float32
        DataNormSparsifier(sparsity_level=0.5), keys=["x", "n", "g"], mask_over="features"
    )  # (multiplied as an int mask, exact and in place)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, generator=gen)
    ints = torch.arange(32).reshape(4, 8)
    grad = torch.randn(4, 8, generator=gen, requires_grad=True)
    batch = {"x": x.clone(), "n": ints.clone(), "g": grad}
    want = tf({"x": x, "n": ints, "g": grad})
    got = tf.apply_in_place(batch)
    assert got["x"] is batch["x"] and torch.equal(batch["x"], want["x"])  # written in place
    assert got["n"] is batch["n"] and got["n"].dtype == torch.int64
    assert torch.equal(got["n"], want["n"]) and (want["n"] == 0).any()
    assert got["g"] is not grad and torch.equal(got["g"], want["g"]) and got["g"].requires_grad

    shared = torch.randn(4, 8, generator=gen)  # one tensor under two keys: two masks, one memory
    two = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), keys=["a", "b"])
    want = two({"a": shared, "b": shared.flip(1)})
    got = two.apply_in_place({"a": shared.clone(), "b": shared.flip(1)})
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])
    aliased = shared.clone()
    got = two.apply_in_place({"a": aliased, "b": aliased[:, :]})
    want = two({"a": shared, "b": shared})
    assert torch.equal(aliased, shared)  # not written: both entries view its memory
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_every_batch_masks_written_by_the_step_match_batch_times_mask_in_and_out_of_place(
    same_bits,
):
    """Every batch over the batch: the step writes the masked batch with the mask (the CPU
    kernel in the same pass); the result is ``batch * mask`` either way, and the batch given
    to ``transform(...)`` is never written."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 256, generator=gen)
    x[0, :3] = torch.tensor([math.nan, -0.0, -1e-3])
    grad = torch.randn(4, 8, generator=gen, requires_grad=True)
    ints = torch.arange(32).reshape(4, 8)
    tf = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), keys=["x", "g", "n"])
    batch = {"x": x.clone(), "g": grad, "n": ints.clone()}
    out = tf(batch)
    masks = {key: tf.sparsifier.get_mask(f"batch_{key}").clone() for key in ("x", "g", "n")}
    assert torch.equal(batch["x"].view(torch.int32), x.view(torch.int32))  # not written
    for key, value in (("x", x), ("g", grad), ("n", ints)):
        want = (value * masks[key]).to(value.dtype)
        assert same_bits(out[key], want)
    assert out["g"].requires_grad and out["g"].grad_fn is not None
    assert (out["x"] == 0).any() and (out["n"] == 0).any()

    batch = {"x": x.clone(), "g": grad, "n": ints.clone()}
    got = tf.apply_in_place(batch)
    assert got["x"] is batch["x"] and torch.equal(
        got["x"].view(torch.int32), out["x"].view(torch.int32)
    )
    assert got["g"] is not grad and torch.equal(got["g"], out["g"]) and got["g"].requires_grad
    assert torch.equal(got["n"], out["n"])


def test_a_collate_fn_returning_views_of_the_dataset_leaves_the_dataset_unchanged():
    storage = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    original = storage.clone()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return i

    def slice_of_storage(indices):  # a batch that is a view of the dataset's own tensor
        return storage[indices[0] : indices[-1] + 1]

    for update in ("every_batch", "frozen"):
        tf = transform(update)
        if update == "frozen":
            tf(original[:4].clone())
        got = list(loader(Rows(), SparsifyCollate(tf, collate_fn=slice_of_storage)))
        assert all((b == 0).any() for b in got)
        assert torch.equal(storage, original)
        assert torch.equal(
            torch.cat(got), torch.cat([tf(original[i : i + 4]) for i in (0, 4, 8, 12)])
        )


class Batches(torch.utils.data.IterableDataset):
    """Yields whole batches (a tensor, a dict, a tuple with an int), as for batch_size=None;
    keeps them, to check that they are never written."""

    def __init__(self, kind):
        gen = torch.Generator().manual_seed(9)
        xs = [torch.randn(4, 8, generator=gen) for _ in range(3)]
        self.items = {
            "tensor": xs,
            "dict": [{"x": x, "y": torch.arange(4)} for x in xs],
            "tuple": [(x, i) for i, x in enumerate(xs)],
        }[kind]

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("kind", ["tensor", "dict", "tuple"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_size_none_sparsifies_each_batch_the_dataset_yields(kind, num_workers):
    """Without automatic batching the DataLoader hands the collate_fn one item, not a list;
    its own default then is default_convert, not default_collate."""
    dataset = Batches(kind)
    kwargs = {"multiprocessing_context": "fork"} if num_workers else {}
    tf = transform()
    got = list(
        loader(dataset, SparsifyCollate(tf), batch_size=None, num_workers=num_workers, **kwargs)
    )
    if num_workers:  # each worker iterates the whole dataset
        got = got[::2]
    want = [transform()(item) for item in dataset.items]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if kind == "tensor":
            a, b = {"x": a}, {"x": b}
        elif kind == "tuple":
            assert a[1] == b[1]
            a, b = {"x": a[0]}, {"x": b[0]}
        assert torch.equal(a["x"], b["x"]) and (a["x"] == 0).any()
    for item in dataset.items:  # the dataset's own tensors are never masked (num_workers=0)
        x = item if kind == "tensor" else item["x"] if kind == "dict" else item[0]
        assert (x != 0).all()
