"""sync_masks across 2 gloo ranks on 127.0.0.1, and its argument checks."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, sync_masks

RANKS_SCRIPT = Path(__file__).with_name("sync_masks_ranks.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_emit_identical_masked_batches_after_sync(tmp_path):
    subprocess.run(
        [sys.executable, str(RANKS_SCRIPT), str(free_port()), str(tmp_path)],
        check=True,
        timeout=180,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["before"], rank1["before"])  # own calibration, own mask
    assert torch.equal(rank0["after"], rank1["after"])  # same input, same masked batch
    assert torch.equal(rank0["after"], rank0["before"])  # src keeps its mask
    # the update=3 counter is synced too, so the ranks refit on the same future batches
    assert rank0["batches_seen"] == rank1["batches_seen"] == 3


@pytest.mark.parametrize(
    "scenario, message",
    [
        ("unfitted_src", r"rank 0 \(src\) has no masks to send"),
        ("mismatch", "rank 1 cannot load rank 0's masks: .*mask_over"),
        ("inherited", r"rank 1 cannot load .*worker process .*pid \d+"),
    ],
)
def test_a_sync_that_cannot_be_done_raises_on_every_rank_and_changes_none(
    tmp_path, scenario, message
):
    subprocess.run(
        [sys.executable, str(RANKS_SCRIPT), str(free_port()), str(tmp_path), scenario],
        check=True,
        timeout=180,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["error"] == ranks[1]["error"]
    assert re.search(message, ranks[0]["error"])
    assert ranks[0]["kept"] and ranks[1]["kept"]


def test_sync_masks_needs_a_process_group_and_a_transform():
    transform = SparsifyTransform(DataNormSparsifier(), update="frozen")
    with pytest.raises(ValueError, match="init_process_group"):
        sync_masks(transform)
    with pytest.raises(TypeError, match="SparsifyTransform, got DataNormSparsifier"):
        sync_masks(DataNormSparsifier())
