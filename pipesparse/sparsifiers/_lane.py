"""A second lane: one helper thread per process that joins a compiled kernel on another core.

The kernel's work is split into chunks that threads claim with an atomic counter, so the
caller never waits for the helper to start: a helper that wakes late finds fewer chunks, or
none, and leaves. A job is posted with its own number; the helper joins it only while it is
still open (an atomic compare-and-swap on ``ctrl[STATE]``), and the caller closes it before
it returns, waiting only for a helper that did join. One caller at a time holds the lane (the
others run alone), a forked child starts its own, and with one torch thread there is none.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["Lane", "borrowed", "STATE", "OPEN", "JOINED", "CLOSED", "LEFT"]

# ctrl[STATE] = job * 4 + one of these; ctrl[LEFT] = the last job the helper left
OPEN, JOINED, CLOSED = 0, 1, 2
STATE, LEFT = 0, 1
_CTRL_SIZE = 8  # the kernel's own counters follow STATE and LEFT
_lane: Lane | None = None
_lane_guard = threading.Lock()


class Lane:
    """The helper thread and the control words a job's threads share."""

    def __init__(self) -> None:
        self.ctrl = np.zeros(_CTRL_SIZE, dtype=np.int64)
        self.ctrl[LEFT] = -1
        self._held = threading.Lock()
        self._wake = threading.Semaphore(0)
        self._jobs = itertools.count()
        self._posted: tuple[int, Callable[..., Any], tuple[Any, ...]] | None = None
        threading.Thread(target=self._serve, name="pipesparse-lane", daemon=True).start()

    def post(self, assist: Callable[..., Any], *args: Any) -> int:
        """Open a new job that the helper joins by calling ``assist(*args, ctrl, job)``."""
        job = next(self._jobs)
        self.ctrl[2:] = 0  # the kernel's counters; no helper is inside a job now
        self.ctrl[STATE] = job * 4 + OPEN
        self._posted = (job, assist, args)
        self._wake.release()
        return job

    def _serve(self) -> None:
        while True:
            self._wake.acquire()
            posted = self._posted
            if posted is not None:
                job, assist, args = posted
                assist(*args, self.ctrl, job)


def _forget_lane() -> None:
    """In a forked child: the helper thread did not come along, and a lock may be held."""
    global _lane, _lane_guard
    _lane = None
    _lane_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_lane)


@contextlib.contextmanager
def borrowed() -> Iterator[Lane | None]:
    """This process's lane while this thread holds it; None when torch runs one thread (as in
    DataLoader workers) or another thread holds the lane."""
    global _lane
    if torch.get_num_threads() < 2:
        yield None
        return
    with _lane_guard:
        if _lane is None:
            _lane = Lane()
        lane = _lane
    if not lane._held.acquire(blocking=False):
        yield None
        return
    try:
        yield lane
    finally:
        lane._held.release()
