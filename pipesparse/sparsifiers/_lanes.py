"""A second thread for GIL-free kernels: two calls at once on a machine's second core.

One thread cannot stream a large batch from memory at the memory's speed. A thread pool's
hand-off costs ~50 us on a small machine, a pair of locks ~20 us: little next to a pass over a
batch of several megabytes, too much for a small one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["run_pair"]


class _Lane:
    """One daemon thread that runs a call each time it is handed one."""

    def __init__(self) -> None:
        self.busy = threading.Lock()  # one caller at a time; others run without the lane
        self._go = threading.Lock()
        self._done = threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._job: Callable[[], object] | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._serve, name="pipesparse-lane", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            try:
                self._job()
            except BaseException as error:  # handed back to the caller, which raises it
                self._error = error
            self._job = None
            self._done.release()

    def run(self, here: Callable[[], object], there: Callable[[], object]) -> None:
        self._job, self._error = there, None
        self._go.release()
        try:
            here()
        finally:
            self._done.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


_LANE: _Lane | None = None
_LANE_PID: int | None = None
_CREATE = threading.Lock()


def _lane() -> _Lane:
    """This process's lane (a forked child starts its own: threads do not survive fork)."""
    global _LANE, _LANE_PID
    with _CREATE:
        if _LANE is None or _LANE_PID != os.getpid():
            _LANE, _LANE_PID = _Lane(), os.getpid()
        return _LANE


def run_pair(here: Callable[[], object], there: Callable[[], object]) -> None:
    """Run ``here`` in this thread and ``there`` on the lane at the same time; one after the
    other when another thread is using the lane. Both must release the GIL to overlap."""
    lane = _lane()
    if not lane.busy.acquire(blocking=False):
        here()
        there()
        return
    try:
        lane.run(here, there)
    finally:
        lane.busy.release()
