"""Per-thread scratch buffers reused from batch to batch by the mask rules.

Per-batch temporaries as big as the batch would otherwise be fresh pages each time (the
allocator hands large blocks back to the OS): on CPU the page faults cost about as much as the
arithmetic. Only for values consumed within one mask update.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["scratch"]

_WORKSPACE = threading.local()
_WORKSPACE_MAX = 16  # buffers kept per thread; more shapes than that start over


def scratch(
    role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A buffer of ``shape`` and ``dtype`` that this thread gets back for the same ``role``."""
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (role, tuple(shape), dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None:
        if len(buffers) >= _WORKSPACE_MAX:
            buffers.clear()
        buffer = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer
