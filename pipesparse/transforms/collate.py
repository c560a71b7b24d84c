"""SparsifyCollate: a DataLoader ``collate_fn`` that sparsifies each collated batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import default_collate

from pipesparse.transforms.core import SparsifyTransform

__all__ = ["SparsifyCollate"]


class SparsifyCollate:
    """Collate samples, then run a :class:`SparsifyTransform` on the batch.

    Runs wherever the DataLoader collates: in the main process (``num_workers=0``) or in every
    worker. Picklable, so fork and spawn workers both get it; persistent masks reach the workers
    through shared memory (see :class:`SparsifyTransform`).

    Args:
        transform: the transform applied to each collated batch.
        collate_fn: how samples become a batch; None: ``torch.utils.data.default_collate``.
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
        collate = default_collate if self.collate_fn is None else self.collate_fn
        return self.transform(collate(samples))

    def __repr__(self) -> str:
        return f"SparsifyCollate({self.transform!r}, collate_fn={self.collate_fn!r})"
