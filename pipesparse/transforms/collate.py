"""SparsifyCollate: a DataLoader ``collate_fn`` that sparsifies each collated batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import default_collate, default_convert

from pipesparse.transforms.core import SparsifyTransform

__all__ = ["SparsifyCollate"]


class SparsifyCollate:
    """Collate samples, then run a :class:`SparsifyTransform` on the batch.

    Runs wherever the DataLoader collates: in the main process (``num_workers=0``) or in every
    worker. Picklable, so fork and spawn workers both get it; persistent masks reach the workers
    through shared memory (see :class:`SparsifyTransform`).

    Args:
        transform: the transform applied to each collated batch.
        collate_fn: how samples become a batch; None: what the DataLoader itself does, so
            ``torch.utils.data.default_collate`` of the list of samples, whose fresh tensors
            are masked in place (see :meth:`SparsifyTransform.apply_in_place`), or, with
            ``batch_size=None`` (the DataLoader hands over one item, not a list),
            ``default_convert`` of the item. The output of any other ``collate_fn`` is never
            written to.
    """

    def __init__(
        self, transform: SparsifyTransform, collate_fn: Callable[[list[Any]], Any] | None = None
    ):
        if not isinstance(transform, SparsifyTransform):
            raise TypeError(
                f"transform must be a SparsifyTransform, got {type(transform).__name__}"
            )
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {type(collate_fn).__name__}")
        self.transform = transform
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        if self.collate_fn is None and not isinstance(samples, list):
            # no automatic batching (batch_size=None): the DataLoader hands over each item the
            # dataset yields, a whole batch, and its own default is default_convert; that keeps
            # the dataset's tensors, so they are masked out of place
            return self.transform(default_convert(samples))
        if self.collate_fn is None or self.collate_fn is default_collate:
            # default_collate stacks the samples into new tensors (in a worker, already in shared
            # memory) that only this call holds, so they are masked in place: no second batch
            # to allocate and copy. Any other collate_fn may return views of the dataset.
            return self.transform.apply_in_place(default_collate(samples))
        return self.transform(self.collate_fn(samples))

    def __repr__(self) -> str:
        return f"SparsifyCollate({self.transform!r}, collate_fn={self.collate_fn!r})"
