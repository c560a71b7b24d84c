"""SparsifyNode in torchdata.nodes, and resuming mid-epoch with the same masks (Loader and
StatefulDataLoader)."""

from __future__ import annotations

import pytest
import torch
from torchdata.nodes import Batcher, IterableWrapper, Loader, Mapper
from torchdata.stateful_dataloader import StatefulDataLoader

from pipesparse import CorruptStateError, DataNormSparsifier
from pipesparse.transforms import SparsifyCollate, SparsifyNode, SparsifyTransform


def rows(n=24, features=8):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(features, generator=gen), "y": i} for i in range(n)]


def transform(update=2):
    return SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update=update)


def stack(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": [i["y"] for i in items]}


def pipeline(tf):
    return SparsifyNode(Mapper(Batcher(IterableWrapper(rows()), batch_size=4), stack), tf)


def assert_same(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["x"], b["x"]) and a["y"] == b["y"]


def test_node_sparsifies_every_item_like_a_mapper():
    got = list(Loader(pipeline(transform())))
    reference = transform()
    want = [reference(stack(rows()[i : i + 4])) for i in range(0, 24, 4)]
    assert_same(got, want)


@pytest.mark.parametrize("update", [2, "frozen", "every_batch"])
def test_loader_resumes_mid_epoch_with_the_same_masks(update):
    straight = list(Loader(pipeline(transform(update))))
    loader = Loader(pipeline(transform(update)))
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    resumed = Loader(pipeline(transform(update)))  # a fresh transform: masks come from the state
    resumed.load_state_dict(state)
    assert_same(head + list(resumed), straight)


def test_masks_carry_over_to_the_next_epoch():
    tf = transform("frozen")
    loader = Loader(pipeline(tf))
    list(loader)
    mask = tf.sparsifier.get_mask("batch").clone()
    list(loader)
    assert torch.equal(tf.sparsifier.get_mask("batch"), mask)


def test_node_checks_arguments_and_state():
    with pytest.raises(TypeError, match="BaseNode, got list"):
        SparsifyNode(rows(), transform())
    with pytest.raises(TypeError, match="SparsifyTransform"):
        SparsifyNode(IterableWrapper(rows()), stack)
    node = pipeline(transform())
    with pytest.raises(CorruptStateError, match="'source', 'transform'"):
        node.reset({"source": {}})


@pytest.mark.parametrize("num_workers, update", [(0, 2), (0, "frozen"), (2, "frozen")])
def test_stateful_dataloader_resume_keeps_the_mask(num_workers, update):
    """Save the transform's state next to the loader's; restore both into fresh objects."""

    def make(calibrate):
        tf = transform(update)
        if calibrate:  # workers apply the main process's mask: calibrate it there
            tf(torch.randn(32, 8, generator=torch.Generator().manual_seed(5)))
        kwargs = {"num_workers": num_workers}
        if num_workers:
            kwargs.update(multiprocessing_context="fork", timeout=60)
        dl = StatefulDataLoader(
            rows(),
            batch_size=4,
            shuffle=True,
            generator=torch.Generator().manual_seed(1),
            collate_fn=SparsifyCollate(tf),
            **kwargs,
        )
        return tf, dl

    def plain(batches):
        return [dict(b, y=b["y"].tolist()) for b in batches]

    straight = plain(make(calibrate=True)[1])
    tf, dl = make(calibrate=True)
    it = iter(dl)
    head = [next(it) for _ in range(2)]
    state = {"loader": dl.state_dict(), "transform": tf.state_dict()}
    del it
    fresh_tf, fresh_dl = make(calibrate=False)  # the masks come from the saved state
    fresh_tf.load_state_dict(state["transform"])
    fresh_dl.load_state_dict(state["loader"])
    assert_same(plain(head) + plain(fresh_dl), straight)


def test_a_reset_that_fails_on_the_source_state_leaves_the_masks_as_they_were():
    tf = transform("frozen")
    tf.fit(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    mask, seen = tf.sparsifier.get_mask("batch").clone(), tf.state_dict()["batches_seen"]
    other = transform("frozen")
    other.fit(-torch.flip(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), [1]))
    other(torch.randn(4, 8))
    assert not torch.equal(other.sparsifier.get_mask("batch"), mask)  # two different masks
    node = pipeline(tf)
    with pytest.raises(KeyError):  # torchdata's own error for a source state it cannot read
        node.reset({"source": {"no": "such state"}, "transform": other.state_dict()})
    assert torch.equal(tf.sparsifier.get_mask("batch"), mask)
    assert tf.state_dict()["batches_seen"] == seen
