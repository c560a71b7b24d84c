"""MaskVersion: lets DataLoader workers read persistent masks that the main process rewrites.

The masks are shared memory that ``fit`` and ``load_state_dict`` write in place while workers
may be multiplying by them; a worker reading half a write would mask a batch with neither the
old nor the new mask. A sequence lock, in shared memory beside the masks: the writer makes the
counter odd while it writes and even after; a reader in another process keeps what it read
only if the counter was even and the same before and after. Readers never block the writer,
and a reader only waits while a write is under way. Python has no memory barrier of its own:
a lock's release followed by an acquire is one, on CPUs that reorder loads (x86 needs none).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar

import torch

__all__ = ["MaskVersion", "MaskWriteTimeout"]

T = TypeVar("T")
_BARRIER = threading.Lock()
_WAIT_LIMIT_S = 120.0  # a write (a fit) takes milliseconds; its first numba compile seconds
_FIRST_NAP_S = 1e-4


class MaskWriteTimeout(RuntimeError):
    """The masks were being rewritten for longer than a reader waits."""


def _fence() -> None:
    with _BARRIER:
        pass
    with _BARRIER:
        pass


class MaskVersion:
    """The sequence counter of one transform's persistent masks. Pickled as the masks are:
    by multiprocessing (spawned DataLoader workers, queues) it is the same counter; by plain
    pickle, deepcopy or dill (a copy of the masks, e.g. in a ``datasets`` fingerprint) a new
    one, so the copy's bytes do not depend on the process or on how often it was written."""

    def __init__(self) -> None:
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._writer = os.getpid()

    def __reduce__(self) -> tuple[Any, ...]:
        return MaskVersion, ()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around every in-place write of the masks (in the process that owns them)."""
        self._count.add_(1)
        _fence()
        try:
            yield
        finally:
            _fence()
            self._count.add_(1)

    @property
    def writer(self) -> int:
        """The pid of the process that writes the masks."""
        return self._writer

    @property
    def elsewhere(self) -> bool:
        """Whether the masks are written by another process than this one (then reads must
        be checked; in the writing process none can overlap a write: a transform is used by
        one thread)."""
        return os.getpid() != self._writer

    def read(self, read: Callable[[], T]) -> T:
        """``read()``, done again until no write overlapped it."""
        if not self.elsewhere:
            return read()
        deadline = time.monotonic() + _WAIT_LIMIT_S
        nap = _FIRST_NAP_S
        while True:
            before = int(self._count)
            _fence()
            if before % 2 == 0:
                result = read()
                _fence()
                if int(self._count) == before:
                    return result
            if time.monotonic() > deadline:
                raise MaskWriteTimeout(
                    f"the masks have been rewritten by process {self._writer} for over "
                    f"{_WAIT_LIMIT_S:.0f} s (a fit or load_state_dict that never finished?)"
                )
            time.sleep(nap)
            nap = min(nap * 2, 0.01)


def _same_counter(count: torch.Tensor, writer: int) -> MaskVersion:
    version = MaskVersion.__new__(MaskVersion)
    version._count, version._writer = count, writer
    return version


ForkingPickler.register(
    MaskVersion, lambda version: (_same_counter, (version._count, version._writer))
)
