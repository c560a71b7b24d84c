"""MaskVersion: the sequence counter that keeps workers from reading half-written masks."""

from __future__ import annotations

import io
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest

from pipesparse.transforms import (
    MaskWriteTimeout,  # public: users catch it
    _mask_version,
)
from pipesparse.transforms._mask_version import MaskVersion


def as_reader(version):
    """The version as another process sees it (reads are checked there)."""
    version._writer = os.getpid() + 1
    return version


def test_the_writing_process_reads_unchecked_and_writes_leave_the_counter_even():
    version = MaskVersion()
    assert not version.elsewhere
    with version.writing():
        assert int(version._count) == 1
        assert version.read(lambda: "read") == "read"  # no wait on its own write
    assert int(version._count) == 2
    with pytest.raises(ValueError), version.writing():
        raise ValueError("a failed write still ends")
    assert int(version._count) == 4


def test_a_read_that_a_write_overlapped_is_done_again():
    version = as_reader(MaskVersion())
    calls = []

    def read():
        calls.append(len(calls))
        if len(calls) == 1:
            version._count.add_(2)  # a whole write happened during this read
        return len(calls)

    assert version.read(read) == 2 and calls == [0, 1]


def test_a_read_waits_for_a_write_and_gives_up_after_the_limit(monkeypatch):
    monkeypatch.setattr(_mask_version, "_WAIT_LIMIT_S", 0.05)
    version = as_reader(MaskVersion())
    version._count.add_(1)  # a write under way that never ends
    with pytest.raises(MaskWriteTimeout, match="rewritten by process"):
        version.read(lambda: pytest.fail("read during a write"))


def test_multiprocessing_pickles_the_same_counter_plain_pickle_a_new_one():
    version = MaskVersion()
    version._count.add_(6)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(version)
    shared = pickle.loads(buffer.getvalue())
    assert int(shared._count) == 6 and shared._writer == version._writer
    version._count.add_(2)
    assert int(shared._count) == 8  # one counter in shared memory
    copy = pickle.loads(pickle.dumps(version))
    assert int(copy._count) == 0 and copy._count.is_shared()
    assert pickle.dumps(version) == pickle.dumps(MaskVersion())  # no pid, no count
