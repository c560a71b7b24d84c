"""sync_masks: give every rank of a torch.distributed group the same masks.

Masks travel as the transform's state_dict (masks as bool, configs, the batch counter; no
data), broadcast with ``torch.distributed.broadcast_object_list`` and loaded in place, so
DataLoader workers already running on each rank see the synced masks too.
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
    rank = dist.get_rank()
    payload = [transform.state_dict() if rank == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    if rank != src:
        transform.load_state_dict(payload[0])
