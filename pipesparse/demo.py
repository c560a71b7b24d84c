"""``pipesparse demo``: the offline job on scikit-learn's bundled digits (read from the installed
package, no download): shards, fitted masks, preprocessing, sparsity, size and throughput,
and pictures of the masks and of digits before/after."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipesparse.plot import plot_masks, plot_samples
from pipesparse.shards.coo import read_sparse
from pipesparse.shards.fit import fit, fit_report
from pipesparse.shards.inputs import discover_shards
from pipesparse.shards.job import build_job
from pipesparse.shards.manifest import MANIFEST_NAME
from pipesparse.shards.preprocess import preprocess
from pipesparse.shards.state import describe_state, load_state_file

__all__ = ["run_demo"]

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (2, 2)}
SHARDS = 4
SAMPLES = 8


def write_digit_shards(folder: Path, shards: int = SHARDS) -> torch.Tensor:
    """The 1797 8x8 digits as ``shards`` Parquet files: ``image`` (8x8 nested lists), ``label``.
    Returns the images, in row order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(np.array_split(np.arange(len(images)), shards)):
        table = pa.table(
            {
                "image": pa.array(images[rows].tolist(), type=pa.list_(pa.list_(pa.float32()))),
                "label": pa.array(digits.target[rows], type=pa.int64()),
            }
        )
        pq.write_table(table, folder / f"digits-{index:02d}.parquet")  # as in _SHARD_FILES
    return torch.from_numpy(images)


def _zeros(folder: Path) -> tuple[float, torch.Tensor]:
    images = torch.cat([read_sparse(p)["image"] for p in sorted(folder.glob("*.parquet"))])
    return float(images.eq(0).float().mean()), images


PER_ROW = {"sparsifier": "norm", "config": CONFIG, "out_format": "coo"}  # preprocess options


def _compile_per_row_kernel(shards: Path) -> float:
    """Seconds to build the per-row job, which runs its mask once: on a fresh install numba
    compiles the CPU kernel there (then caches it on disk). Done before the timed runs, so
    the per-row throughput is the kernel's, not the compiler's."""
    started = time.perf_counter()
    build_job(discover_shards([str(shards)]), "image", state=None, **PER_ROW)
    return time.perf_counter() - started


RUNS = ("frozen_dense", "frozen_coo", "per_row_coo")  # one output folder per preprocess run
_FOLDERS = frozenset({"shards", *RUNS})
_FILES = frozenset({"masks.pt", "masks.png", "samples.png"})
_SHARD_FILES = frozenset(f"digits-{index:02d}.parquet" for index in range(SHARDS))
_RUN_FILES = _SHARD_FILES | {MANIFEST_NAME, ".pipesparse.lock"}
_TEMP = ".pipesparse-"  # temp files and scratch folders of a killed run start with it


def _written_by_demo(relative: tuple[str, ...], is_dir: bool) -> bool:
    """Whether the demo writes this path (relative to its folder), or a killed demo left it."""
    top, *rest = relative
    if not rest:
        if top in _FOLDERS:
            return is_dir
        return not is_dir and (top in _FILES or top.startswith(_TEMP))
    if top not in _FOLDERS:
        return False
    if top in RUNS and rest[0].startswith(_TEMP):
        return True  # a temp file, or a scratch folder and what is in it
    files = _SHARD_FILES if top == "shards" else _RUN_FILES
    return len(rest) == 1 and not is_dir and rest[0] in files


def _clear(out: Path) -> None:
    """Remove a previous demo's output, file by file: only what the demo writes. Anything else
    in the folder (also inside the demo's own subfolders, and any symlink) makes the demo
    refuse before it deletes anything."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"{out} exists and is not a folder the demo wrote; pass another --out")
    paths = sorted(out.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # deepest first
    foreign = sorted(
        p.relative_to(out).as_posix()
        for p in paths
        if p.is_symlink() or not _written_by_demo(p.relative_to(out).parts, p.is_dir())
    )
    if foreign:
        raise ValueError(
            f"{out} exists and holds files the demo did not write ({foreign[:3]}); "
            "pass another --out"
        )
    for path in paths:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


def run_demo(out: str | Path = "demo_out", quiet: bool = False) -> dict:
    """Run the demo into ``out`` (a previous demo's output there is replaced); returns the
    numbers it printed."""
    out = Path(out)
    _clear(out)
    before = write_digit_shards(out / "shards")
    rows = len(before)
    print(f"wrote {rows} scikit-learn digits (8x8) as {SHARDS} Parquet shards in {out / 'shards'}")

    state_path = out / "masks.pt"
    state = fit([str(out / "shards")], "image", state_path, "norm", CONFIG, quiet=quiet)
    print(fit_report(state, state_path))

    compile_seconds = _compile_per_row_kernel(out / "shards")
    if compile_seconds > 1.0:
        print(
            f"compiled the CPU mask kernel for per-row masks in {compile_seconds:.1f}s "
            "(first run only: numba caches it)"
        )
    runs = {}
    options = (
        {"state": str(state_path)},
        {"state": str(state_path), "out_format": "coo"},
        PER_ROW,
    )
    for name, kwargs in zip(RUNS, options, strict=True):
        summary = preprocess([str(out / "shards")], out / name, "image", quiet=quiet, **kwargs)
        runs[name] = summary
        print(f"{name}: {summary}")

    input_zeros = float(before.eq(0).float().mean())
    frozen_zeros, frozen = _zeros(out / "frozen_coo")
    row_zeros, per_row = _zeros(out / "per_row_coo")
    mass = float(frozen.abs().sum() / before.abs().sum())
    row_mass = float(per_row.abs().sum() / before.abs().sum())
    dense, coo = runs["frozen_dense"].output_bytes, runs["frozen_coo"].output_bytes
    print(
        f"zeros: input {input_zeros:.1%}, fitted mask {frozen_zeros:.1%} (keeps {mass:.1%} of the "
        f"ink), per-row masks {row_zeros:.1%} (keeps {row_mass:.1%})"
    )
    print(f"size: dense {dense:,} B, coo {coo:,} B ({1 - coo / dense:.1%} smaller)")
    throughput = max(s.rows_per_second for s in runs.values())
    print(f"throughput: up to {throughput:,.0f} rows/s (local engine, one process)")

    described = describe_state(load_state_file(state_path), str(state_path))["masks"]
    masks = {m["column"] or n: m["mask"] for n, m in described.items()}
    plot_masks(masks, out / "masks.png", title="fitted 2x2-block mask (white = kept)")
    picks = torch.arange(SAMPLES)
    plot_samples(
        [
            ("input", before[picks]),
            ("fitted mask", frozen[picks]),
            ("per-row mask", per_row[picks]),
        ],
        out / "samples.png",
        title="digits before / after sparsifying (50% of 2x2 blocks)",
    )
    print(f"pictures: {out / 'masks.png'}, {out / 'samples.png'}")
    return {
        "rows": rows,
        "input_zeros": input_zeros,
        "frozen_zeros": frozen_zeros,
        "per_row_zeros": row_zeros,
        "dense_bytes": dense,
        "coo_bytes": coo,
        "rows_per_second": throughput,
    }
