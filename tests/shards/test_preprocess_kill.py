"""kill -9 a real `pipesparse preprocess` at several moments; the rerun must equal a clean run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipesparse.shards import read_sparse

SHARDS, ROWS = 8, 240
WAIT = 90.0  # seconds, per moment: a bound, never an expectation


def _write_inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(SHARDS):
        images = rng.normal(size=(ROWS, 16, 16)).astype(np.float32)
        table = pa.table(
            {
                "id": np.arange(ROWS) + index * ROWS,
                "img": pa.array(images.tolist(), pa.list_(pa.list_(pa.float32()))),
            }
        )
        pq.write_table(table, folder / f"part-{index}.parquet")


def _command(inputs, out):
    return [
        sys.executable, "-m", "pipesparse.cli", "preprocess", str(inputs), "--out", str(out),
        "--columns", "img", "--sparsifier", "norm", "--config", "sparse_block_shape=2,2",
        "--batch-rows", "8", "--quiet",
    ]  # fmt: skip


def _finished(out):
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return -1


def _temp_files(out):
    return [p for p in out.glob(".pipesparse-*.tmp")] if out.exists() else []


def _kill_when(inputs, out, moment):
    """Start a run on ``out`` and SIGKILL it when ``moment(out, start)`` holds (or it ends)."""
    start = _finished(out)
    proc = subprocess.Popen(
        _command(inputs, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + WAIT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if moment(out, start):
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    return proc.returncode


MOMENTS = [
    lambda out, start: _finished(out) >= 0,  # manifest written, before the first shard
    lambda out, start: bool(_temp_files(out)),  # in the middle of writing a shard
    lambda out, start: _finished(out) >= max(start, 0) + 1,  # right after a shard is recorded
    lambda out, start: _finished(out) >= max(start, 0) + 2 and bool(_temp_files(out)),
]


def test_killed_runs_resume_to_the_clean_result(tmp_path):
    inputs = tmp_path / "in"
    _write_inputs(inputs)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_command(inputs, clean), check=True, capture_output=True, timeout=300)

    codes = [_kill_when(inputs, killed, moment) for moment in MOMENTS]
    assert -signal.SIGKILL in codes  # at least one run really died mid-way
    done = subprocess.run(_command(inputs, killed), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    clean_manifest = json.loads((clean / "manifest.json").read_text())
    killed_manifest = json.loads((killed / "manifest.json").read_text())
    assert killed_manifest["shards"] == clean_manifest["shards"]  # same rows and checksums
    names = sorted(p.name for p in killed.glob("*.parquet"))
    assert names == [f"part-{i}.parquet" for i in range(SHARDS)]
    assert not _temp_files(killed) and not list(killed.glob(".pipesparse-scratch-*"))
    for name in names:
        assert (killed / name).read_bytes() == (clean / name).read_bytes()
        assert torch.equal(read_sparse(killed / name)["img"], read_sparse(clean / name)["img"])
