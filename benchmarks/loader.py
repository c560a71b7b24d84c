"""DataLoader with the SparsifyCollate hook vs the same DataLoader without it.

    python benchmarks/loader.py            # the README table (about a minute on 2 cores)
    python benchmarks/loader.py --quick    # fewer epochs

An in-memory dataset of float32 rows, 2 workers (persistent, so start-up is not timed), the
same sampler and batch size for every loader; an epoch's wall time in the main process is the
figure. Loaders take turns epoch by epoch; the added time is the median of each round's pair
(this VM's speed drifts by tens of percent within a minute). Rule: DataNormSparsifier, L1,
1x4 blocks, sparsity 0.5; "frozen" fits its mask in the main process first (mask over
features), as a loader with workers needs. "bound" multiplies each collated batch in place by
a ready mask of its shape: the least a masking collate can add on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import THREADS, paired_ratio, round_times, setup_threads, table  # noqa: E402

from pipesparse import DataNormSparsifier  # noqa: E402
from pipesparse.transforms import SparsifyCollate, SparsifyTransform  # noqa: E402

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "norm": "L1"}
ROWS, FEATURES, BATCH = 32768, 1024, 256
REFERENCE_ROWS = 8192  # torch.ao is slow: its loader reads the first rows only
WORKERS = 2


class Rows(Dataset):
    """Rows of one in-memory float32 matrix: the cheapest dataset a loader can have."""

    def __init__(self, rows: int, features: int):
        self.data = torch.randn(rows, features, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class ReferenceCollate:
    """torch.ao's data sparsifier in a collate_fn: add_data, step, masked get_data per batch."""

    def __init__(self):
        self.sparsifier = RefNorm(**CONFIG)

    def __call__(self, samples: list[torch.Tensor]) -> torch.Tensor:
        warnings.simplefilter("ignore")  # it warns on every re-registration, in every worker
        self.sparsifier.add_data("batch", default_collate(samples))
        self.sparsifier.step()
        return self.sparsifier.get_data("batch", return_original=False).detach()


def ready_mask(rows: int, features: int) -> torch.Tensor:
    """A float32 0/1 mask of a batch's shape, half zeros, as an every-batch mask is."""
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(rows, features, generator=generator) >= 0.5).float()


class BoundCollate:
    """default_collate, then the batch multiplied in place by a ready mask of its shape: what
    masking a collated batch costs at the least (no mask to compute)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, samples: list[torch.Tensor]) -> torch.Tensor:
        return default_collate(samples).mul_(self.mask)


def loader(dataset: Dataset, collate_fn) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=False,
        num_workers=WORKERS,
        collate_fn=collate_fn,
        persistent_workers=True,
        prefetch_factor=4,
    )


def epoch(data_loader: DataLoader):
    def run() -> None:
        for _ in data_loader:
            pass

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs per loader")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    dataset = Rows(ROWS, FEATURES)
    frozen = SparsifyTransform(DataNormSparsifier(**CONFIG), update="frozen")
    frozen.fit(dataset.data[:BATCH])
    loaders = {
        "plain": loader(dataset, default_collate),
        "every": loader(dataset, SparsifyCollate(SparsifyTransform(DataNormSparsifier(**CONFIG)))),
        "frozen": loader(dataset, SparsifyCollate(frozen)),
        "bound": loader(dataset, BoundCollate(ready_mask(BATCH, FEATURES))),
        "reference": loader(Subset(dataset, range(REFERENCE_ROWS)), ReferenceCollate()),
    }
    repeats = 3 if args.quick else 15
    times = round_times({name: epoch(dl) for name, dl in loaders.items()}, repeats)
    per_batch = {
        name: [seconds / len(loaders[name]) for seconds in times[name]] for name in loaders
    }
    rows = []
    for label, name in (
        ("SparsifyCollate, every batch", "every"),
        ("SparsifyCollate, frozen", "frozen"),
        ("bound: default_collate + in-place multiply by a ready mask", "bound"),
        ("torch.ao in collate_fn, every batch", "reference"),
    ):
        added = paired_ratio(per_batch[name], per_batch["plain"]) - 1
        rows.append(
            [
                label,
                1 / statistics.median(per_batch[name]),
                1 / statistics.median(per_batch["plain"]),
                f"{100 * added:+.1f}%",
            ]
        )
    title = (
        f"DataLoader over an in-memory dataset ({ROWS}x{FEATURES} float32, batch {BATCH}, "
        f"{WORKERS} workers, main process {threads} threads, torch {torch.__version__}). "
        f"Batches/s over an epoch (median of {repeats} epochs). Baseline: the same loader with "
        "default_collate. Added wall time = time per batch / baseline time per batch - 1, the "
        "median over rounds of each round's pair (loaders take turns epoch by epoch) "
        f"(torch.ao: first {REFERENCE_ROWS} rows only)."
    )
    header = ["collate", "batches/s", "baseline batches/s", "added wall time"]
    print(table(title, header, rows))


if __name__ == "__main__":
    main()
