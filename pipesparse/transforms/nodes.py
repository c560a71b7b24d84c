"""SparsifyNode: a torchdata.nodes node that sparsifies every item of its source.

Like ``torchdata.nodes.Mapper(source, transform)`` (the transform runs inline, in order), but
stateful: the transform's masks and batch counter are saved with the source's position, so a
``torchdata.nodes.Loader`` resumed mid-epoch continues with the same masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchdata.nodes import BaseNode

from pipesparse.errors import CorruptStateError
from pipesparse.transforms.core import SparsifyTransform

__all__ = ["SparsifyNode"]


class SparsifyNode(BaseNode):
    """Yield ``transform(item)`` for every item of ``source``.

    Args:
        source: the node whose items (batches) are sparsified.
        transform: the transform applied to each item; its state is part of this node's state.
    """

    SOURCE_KEY = "source"
    TRANSFORM_KEY = "transform"

    def __init__(self, source: BaseNode, transform: SparsifyTransform):
        super().__init__()
        if not isinstance(source, BaseNode):
            raise TypeError(
                f"source must be a torchdata.nodes BaseNode, got {type(source).__name__}"
            )
        if not isinstance(transform, SparsifyTransform):
            raise TypeError(
                f"transform must be a SparsifyTransform, got {type(transform).__name__}"
            )
        self.source = source
        self.transform = transform

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:  # a new epoch: the masks carry over
            self.source.reset()
            return
        if not isinstance(initial_state, Mapping) or not {
            self.SOURCE_KEY,
            self.TRANSFORM_KEY,
        } <= set(initial_state):
            got = sorted(initial_state) if isinstance(initial_state, Mapping) else initial_state
            raise CorruptStateError(
                f"SparsifyNode state needs the keys {[self.SOURCE_KEY, self.TRANSFORM_KEY]}, "
                f"got {got!r}"
            )
        # the transform's state is checked on a copy, the source reset, and only then are the
        # masks loaded: a state that either part refuses leaves the masks as they were
        self.transform._check_loadable(initial_state[self.TRANSFORM_KEY])
        self.source.reset(initial_state[self.SOURCE_KEY])
        self.transform.load_state_dict(initial_state[self.TRANSFORM_KEY])

    def next(self) -> Any:
        return self.transform(next(self.source))

    def get_state(self) -> dict[str, Any]:
        return {
            self.SOURCE_KEY: self.source.state_dict(),
            self.TRANSFORM_KEY: self.transform.state_dict(),
        }
