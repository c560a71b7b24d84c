"""``pipesparse demo``: the offline job on scikit-learn's bundled digits (read from the installed
package, no download): shards, fitted masks, preprocessing, sparsity, size and throughput,
and pictures of the masks and of digits before/after."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipesparse.plot import plot_masks, plot_samples
from pipesparse.shards.coo import read_sparse
from pipesparse.shards.fit import fit, fit_report
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
        pq.write_table(table, folder / f"digits-{index:02d}.parquet")
    return torch.from_numpy(images)


def _zeros(folder: Path) -> tuple[float, torch.Tensor]:
    images = torch.cat([read_sparse(p)["image"] for p in sorted(folder.glob("*.parquet"))])
    return float(images.eq(0).float().mean()), images


_OUTPUTS = frozenset(
    {"shards", "masks.pt", "frozen_dense", "frozen_coo", "per_row_coo", "masks.png", "samples.png"}
)


def _clear(out: Path) -> None:
    """Remove a previous demo's output; refuse to delete a folder the demo did not write."""
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUTS)
    if not out.is_dir() or foreign:
        raise ValueError(
            f"{out} exists and holds files the demo did not write ({foreign[:3]}); "
            "pass another --out"
        )
    shutil.rmtree(out)


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

    runs = {}
    for name, kwargs in {
        "frozen_dense": {"state": str(state_path)},
        "frozen_coo": {"state": str(state_path), "out_format": "coo"},
        "per_row_coo": {"sparsifier": "norm", "config": CONFIG, "out_format": "coo"},
    }.items():
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
