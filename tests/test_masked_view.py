"""The masked view a rule writes in the same pass as the mask (DataNormSparsifier on CPU):
``get_data(name, return_original=False)`` must always equal ``data * mask``, whatever the user
did between the step and the read."""

import copy
import pickle

import torch

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform


def _read_every_step(sparsifier, x, steps=3):
    views = []
    for _ in range(steps):
        sparsifier.step()
        views.append(sparsifier.get_data("x", return_original=False))
    return views


def test_a_loop_reading_the_masked_view_gets_it_from_the_step():
    x = torch.randn(64, 128)
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("x", x)
    first, second, third = _read_every_step(sparsifier, x)
    mask = sparsifier.get_mask("x")
    for view in (first, second, third):
        assert torch.equal(view, x * mask)
    # from the second step on, the step wrote the view (no multiply at read time): the kept
    # view is handed out exactly once, then reads compute afresh
    sparsifier.step()
    assert "x" in sparsifier._masked_views
    view = sparsifier.get_data("x", return_original=False)
    assert "x" not in sparsifier._masked_views
    again = sparsifier.get_data("x", return_original=False)
    assert again is not view and torch.equal(again, view)


def test_the_view_is_recomputed_when_data_or_mask_changed_in_place():
    x = torch.randn(32, 64)
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("x", x)
    _read_every_step(sparsifier, x, steps=1)
    sparsifier.step()
    x.mul_(3)  # the user edits the attached data after the step
    assert torch.equal(
        sparsifier.get_data("x", return_original=False), x * sparsifier.get_mask("x")
    )
    sparsifier.step()
    sparsifier.get_mask("x")[0] = 1  # the user edits the mask
    assert torch.equal(
        sparsifier.get_data("x", return_original=False), x * sparsifier.get_mask("x")
    )


def test_a_new_registration_or_squash_drops_the_kept_view():
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("x", x)
    _read_every_step(sparsifier, x, steps=1)
    sparsifier.step()
    sparsifier.add_data("x", y)  # same shape: the per-batch re-registration
    assert torch.equal(
        sparsifier.get_data("x", return_original=False), y * sparsifier.get_mask("x")
    )
    sparsifier.step()
    sparsifier.squash_mask()
    assert torch.equal(sparsifier.get_data("x", return_original=False), y)


def test_data_that_requires_grad_keeps_its_graph():
    weight = torch.randn(16, 32, requires_grad=True)
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("w", weight)
    for _ in range(2):
        sparsifier.step()
        view = sparsifier.get_data("w", return_original=False)
    assert view.requires_grad
    view.sum().backward()
    assert torch.equal(weight.grad, sparsifier.get_mask("w"))


def test_pickle_and_deepcopy_leave_the_kept_view_behind():
    x = torch.randn(16, 32)
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    sparsifier.add_data("x", x)
    _read_every_step(sparsifier, x, steps=1)
    sparsifier.step()
    assert sparsifier._masked_views
    for clone in (copy.deepcopy(sparsifier), pickle.loads(pickle.dumps(sparsifier))):
        assert clone._masked_views == {}
        data = clone.get_data("x")
        assert torch.equal(clone.get_data("x", return_original=False), data * clone.get_mask("x"))


def test_every_batch_transform_output_equals_batch_times_mask():
    transform = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5))
    kept = []
    keep = transform.sparsifier._keep_masked_view
    transform.sparsifier._keep_masked_view = lambda name, view: (
        kept.append(name),
        keep(name, view),
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = torch.randn(32, 64, generator=generator)
        before = batch.clone()
        out = transform(batch)
        assert torch.equal(batch, before)  # the batch itself is never written
        assert out.data_ptr() != batch.data_ptr()
        assert torch.equal(out, batch * transform.sparsifier.get_mask("batch"))
    assert kept == ["batch"] * 4  # from the second batch on, the step wrote the output
    assert transform.sparsifier._masked_views == {}  # handed out, nothing kept
