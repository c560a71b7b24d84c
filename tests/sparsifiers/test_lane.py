"""The second lane (:mod:`pipesparse.sparsifiers._lane`): a helper thread that joins the norm
kernel's passes on one large matrix. Whether and when it joins may only change the speed: the
masks must stay exact, a late helper must change nothing, and a caller must never hang."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numba
import numpy as np
import pytest
import torch

from pipesparse.sparsifiers import _lane, _norm_kernel
from pipesparse.sparsifiers._atomics import atomic_add, atomic_cas, atomic_load, atomic_store
from pipesparse.sparsifiers.norm import DataNormSparsifier, norm_keep_mask

LARGE = (512, 1024)  # above the kernel's size for two lanes
BLOCK = (1, 4)


@pytest.fixture(autouse=True)
def two_torch_threads():
    """The lane runs only where torch may use two threads; each test gets exactly two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def lane_state() -> tuple[int, int]:
    """(last job's number, its state: OPEN, JOINED or CLOSED) of this process's lane."""
    state = int(_lane._lane.ctrl[_lane.STATE])
    return state // 4, state % 4


def write(x: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    mask = torch.empty_like(x)
    k = round(level * x.shape[0] * (x.shape[1] // BLOCK[1]))
    _norm_kernel.write_mask(x[None], mask, k, BLOCK, BLOCK[0] * BLOCK[1], "L1")
    return mask


# ------------------------------------------------------------------------------ atomics


@numba.njit(nogil=True)
def _count_up(ctrl, times):
    for _ in range(times):
        atomic_add(ctrl, 0, 1)


def test_atomic_add_from_two_threads_loses_no_update():
    ctrl = np.zeros(2, dtype=np.int64)
    _count_up(ctrl, 1)  # compile outside the race
    ctrl[0] = 0
    threads = [threading.Thread(target=_count_up, args=(ctrl, 200_000)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert ctrl[0] == 400_000


@numba.njit
def _cas_store_load(ctrl):
    first = atomic_cas(ctrl, 0, 0, 5)  # holds 0: swapped
    second = atomic_cas(ctrl, 0, 0, 7)  # holds 5 now: left alone
    atomic_store(ctrl, 1, 9)
    return first, second, atomic_load(ctrl, 0), atomic_load(ctrl, 1)


def test_compare_and_swap_store_and_load():
    assert _cas_store_load(np.zeros(2, dtype=np.int64)) == (True, False, 5, 9)


# -------------------------------------------------------------------------- who holds it


def test_no_lane_with_one_torch_thread():
    torch.set_num_threads(1)  # as in every DataLoader worker
    with _lane.borrowed() as lane:
        assert lane is None


def test_one_thread_holds_the_lane_at_a_time():
    seen = []
    with _lane.borrowed() as lane:
        assert lane is not None
        worker = threading.Thread(target=lambda: seen.append(_lane.borrowed().__enter__()))
        worker.start()
        worker.join(timeout=60)
    assert seen == [None]  # the other thread runs alone meanwhile
    with _lane.borrowed() as again:
        assert again is lane


# ------------------------------------------------------------------------ exact with two


def test_two_lanes_give_the_masks_of_one():
    generator = torch.Generator().manual_seed(0)
    scales = itertools.cycle((1.0, 1.0, 1e3, 1e3, 1e-30, 1.0))  # bracket misses and hits
    # with a cold numba cache the helper compiles its side first, and joins no job meanwhile
    deadline = time.monotonic() + 180
    calls = joined = 0
    while calls < 24 or (not joined and time.monotonic() < deadline):
        x = torch.randn(LARGE, generator=generator) * next(scales)
        assert torch.equal(write(x).bool(), norm_keep_mask(x, 0.5, BLOCK, None))
        calls += 1
        joined += lane_state()[1] == _lane.JOINED
    assert joined >= 1, "the helper never joined: the two-lane path was not tested"


def test_threads_share_one_lane_and_stay_exact():
    def run(worker):
        generator = torch.Generator().manual_seed(worker)
        sparsifier = DataNormSparsifier(sparsity_level=0.3 + 0.1 * worker)
        out = []
        for _ in range(4):
            x = torch.randn(LARGE, generator=generator) * 10.0**worker
            sparsifier.add_data("x", x)
            sparsifier.step()
            out.append((x, sparsifier.get_mask("x").clone()))
        return out

    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(run, range(3)))
    for worker, results in enumerate(outcomes):
        for x, mask in results:
            assert torch.equal(mask.bool(), norm_keep_mask(x, 0.3 + 0.1 * worker, BLOCK, None))


def test_a_helper_that_comes_after_the_job_closed_changes_nothing():
    x = torch.randn(LARGE)
    write(x)  # buffers for this shape, and the lane
    buffers = _norm_kernel._buffers(*LARGE, torch.float32, BLOCK)
    mask = torch.full(LARGE, 7.0)
    ctrl = np.zeros(8, dtype=np.int64)
    ctrl[_lane.STATE] = 5 * 4 + _lane.CLOSED
    _norm_kernel._assist(x.numpy(), False, *BLOCK, mask.numpy(), buffers, None, False, ctrl, 5)
    assert torch.equal(mask, torch.full(LARGE, 7.0))
    assert ctrl.tolist() == [5 * 4 + _lane.CLOSED] + [0] * 7


def test_ending_a_job_twice_returns_at_once():
    # e.g. an interrupt raised just after the kernel returned: the error path ends it again
    ctrl = np.zeros(8, dtype=np.int64)
    ctrl[_lane.LEFT] = -1
    ctrl[_lane.STATE] = 3 * 4 + _lane.OPEN
    _norm_kernel._close(ctrl, 3)
    assert ctrl[_lane.STATE] == 3 * 4 + _lane.CLOSED
    again = threading.Thread(target=_norm_kernel._close, args=(ctrl, 3), daemon=True)
    again.start()
    again.join(timeout=30)
    assert not again.is_alive(), "ending a closed job waits for a helper that never joined"


def test_a_job_that_fails_lets_the_helper_go():
    real = _norm_kernel._masks

    def fail_once_the_helper_joined(*args):
        deadline = time.monotonic() + 180  # a cold numba cache: the helper compiles first
        while lane_state()[1] != _lane.JOINED and time.monotonic() < deadline:
            time.sleep(0.001)
        raise RuntimeError("stopped mid-job")

    x = torch.randn(LARGE)
    write(x)
    with mock.patch.object(_norm_kernel, "_masks", fail_once_the_helper_joined):
        with pytest.raises(RuntimeError, match="stopped mid-job"):
            write(x)
    job, state = lane_state()
    assert state == _lane.JOINED and _lane._lane.ctrl[_lane.LEFT] == job  # it left
    assert _norm_kernel._masks is real
    assert torch.equal(write(x).bool(), norm_keep_mask(x, 0.5, BLOCK, None))


def _child(x, expected, queue):
    # numpy only around the kernel: torch's own OpenMP pool is not fork-safe (torch's
    # DataLoader workers run one thread for that reason), so a torch op on two threads in a
    # child of a parent that used them could hang for reasons of torch's own
    mask = torch.from_numpy(np.empty(LARGE, dtype=np.float32))
    k = round(0.5 * LARGE[0] * (LARGE[1] // BLOCK[1]))
    with _lane.borrowed() as lane:
        assert lane is not None, "the child has no lane"
    _norm_kernel.write_mask(x[None], mask, k, BLOCK, BLOCK[0] * BLOCK[1], "L1")
    queue.put(bool(np.array_equal(mask.numpy(), expected)))


def test_a_forked_child_gets_a_lane_of_its_own():
    x = torch.randn(LARGE, generator=torch.Generator().manual_seed(3))
    expected = norm_keep_mask(x, 0.5, BLOCK, None).float().numpy()
    write(x)  # the parent's helper thread exists before the fork
    with _lane.borrowed():  # and the parent holds the lane while it forks
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child, args=(x, expected, queue))
        child.start()
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=10) is True
