"""The second thread that large masks are split over: both calls run, errors come back to the
caller, concurrent callers and forked children never deadlock."""

import multiprocessing
import threading
import time

import pytest

from pipesparse.sparsifiers._lanes import run_pair


def test_both_calls_run_and_overlap():
    seen = []
    both = threading.Barrier(2)  # passes only if the two calls run at the same time

    def call(tag):
        both.wait(timeout=10)
        seen.append(tag)

    run_pair(lambda: call("here"), lambda: call("there"))
    assert sorted(seen) == ["here", "there"]


def test_an_error_on_the_lane_reaches_the_caller_and_the_lane_keeps_working():
    def fail():
        raise RuntimeError("boom on the lane")

    with pytest.raises(RuntimeError, match="boom on the lane"):
        run_pair(lambda: None, fail)
    done = []
    run_pair(lambda: done.append(1), lambda: done.append(2))
    assert sorted(done) == [1, 2]


def test_callers_from_many_threads_all_finish():
    counts = []

    def caller():
        for _ in range(50):
            pair = []
            run_pair(lambda p=pair: p.append(1), lambda p=pair: (time.sleep(0.0005), p.append(2)))
            counts.append(sorted(pair) == [1, 2])

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(counts) == 200 and all(counts)


def _child(queue):
    out = []
    run_pair(lambda: out.append("here"), lambda: out.append("there"))
    queue.put(sorted(out))


def test_a_forked_child_gets_its_own_lane():
    run_pair(lambda: None, lambda: None)  # the parent's lane exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == ["here", "there"]
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
