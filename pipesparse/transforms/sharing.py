"""sync_masks: give every rank of a torch.distributed group the same masks.

Masks travel as the transform's state_dict (masks as bool, configs, the batch counter; no
data), broadcast with ``torch.distributed.broadcast_object_list`` and loaded in place, so
DataLoader workers already running on each rank see the synced masks too. Each rank first
checks that it can load them (on a copy) and the ranks share the outcome, so either every rank
loads or every rank raises the same error.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from pipesparse.transforms.core import SparsifyTransform

__all__ = ["sync_masks"]


def sync_masks(transform: SparsifyTransform, src: int = 0, group: Any = None) -> None:
    """Broadcast rank ``src``'s mask state to every rank of ``group`` and load it in place.

    A collective: every rank of ``group`` must call it. ``src`` is a global rank, as in
    ``torch.distributed.broadcast_object_list``; ``group`` None means the default group.
    """
    if not isinstance(transform, SparsifyTransform):
        raise TypeError(f"transform must be a SparsifyTransform, got {type(transform).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "sync_masks needs an initialized torch.distributed process group; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(
            f"sync_masks: rank {dist.get_rank()} is not in the group it was given; only the "
            "group's ranks call it"
        )
    rank = dist.get_rank()
    payload = [transform.state_dict() if rank == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, _problem(transform, payload[0], rank, src), group=group)
    failed = [problem for problem in problems if problem]
    if failed:  # every rank raises, none has changed: no rank waits on the others later
        raise ValueError(f"sync_masks changed no rank: {'; '.join(failed)}")
    if rank != src:
        transform.load_state_dict(payload[0])


def _problem(transform: SparsifyTransform, state: Any, rank: int, src: int) -> str | None:
    """Why this rank cannot take ``state`` (src: why it cannot send it), or None. Checked on a
    copy, so that every rank knows the outcome of all before any mask changes."""
    if rank == src:
        if not transform.sparsifier.state:
            return f"rank {src} (src) has no masks to send: fit or load its transform first"
        return None
    try:
        transform._check_loadable(state)
    except (TypeError, ValueError) as err:  # CorruptStateError is a ValueError
        return f"rank {rank} cannot load rank {src}'s masks: {err}"
    return None
