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

Beside wall time, the CPU each loader spends per batch, its main process and workers together
(Linux /proc): the work itself, apart from the time the processes spend waiting on each other.
`--sharing-strategy file_system` runs every loader with torch's other way of handing batches
to the main process (see the README).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    THREADS,
    cpu_seconds,
    paired_ratio,
    round_times,
    setup_threads,
    table,
)

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


class WorkerPids:
    """A worker_init_fn that records each worker's pid, so the run can read its CPU time."""

    def __init__(self):
        self.pids = multiprocessing.Array("i", WORKERS, lock=False)

    def __call__(self, worker_id: int) -> None:
        self.pids[worker_id] = os.getpid()


class Loader:
    """A DataLoader with 2 persistent workers, and the CPU it spends over the timed epochs."""

    def __init__(self, dataset: Dataset, collate_fn):
        self.workers = WorkerPids()
        self.data_loader = DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=False,
            num_workers=WORKERS,
            collate_fn=collate_fn,
            persistent_workers=True,
            prefetch_factor=4,
            worker_init_fn=self.workers,
        )
        self.cpu = 0.0
        self.batches = 0

    def _total_cpu(self) -> float | None:
        """CPU seconds of this process and of the workers; None before they started."""
        workers = [cpu_seconds(pid) if pid else None for pid in self.workers.pids]
        if None in workers:
            return None
        return time.process_time() + sum(workers)

    def epoch(self) -> None:
        start = self._total_cpu()  # None in the warm-up epoch, which starts the workers
        for _ in self.data_loader:
            pass
        end = self._total_cpu()
        if start is not None and end is not None:
            self.cpu += end - start
            self.batches += len(self.data_loader)

    def cpu_per_batch(self) -> float | None:
        return self.cpu / self.batches if self.batches else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs per loader")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    parser.add_argument(
        "--sharing-strategy",
        choices=torch.multiprocessing.get_all_sharing_strategies(),
        default=torch.multiprocessing.get_sharing_strategy(),
        help="how workers hand batches to the main process (torch.multiprocessing)",
    )
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)
    dataset = Rows(ROWS, FEATURES)
    frozen = SparsifyTransform(DataNormSparsifier(**CONFIG), update="frozen")
    frozen.fit(dataset.data[:BATCH])
    loaders = {
        "plain": Loader(dataset, default_collate),
        "every": Loader(dataset, SparsifyCollate(SparsifyTransform(DataNormSparsifier(**CONFIG)))),
        "frozen": Loader(dataset, SparsifyCollate(frozen)),
        "bound": Loader(dataset, BoundCollate(ready_mask(BATCH, FEATURES))),
        "reference": Loader(Subset(dataset, range(REFERENCE_ROWS)), ReferenceCollate()),
    }
    repeats = 3 if args.quick else 15
    times = round_times({name: ld.epoch for name, ld in loaders.items()}, repeats)
    per_batch = {
        name: [seconds / len(loaders[name].data_loader) for seconds in times[name]]
        for name in loaders
    }
    plain_cpu = loaders["plain"].cpu_per_batch()
    rows = []
    for label, name in (
        ("SparsifyCollate, every batch", "every"),
        ("SparsifyCollate, frozen", "frozen"),
        ("bound: default_collate + in-place multiply by a ready mask", "bound"),
        ("torch.ao in collate_fn, every batch", "reference"),
    ):
        added = paired_ratio(per_batch[name], per_batch["plain"]) - 1
        cpu = loaders[name].cpu_per_batch()
        cpu_cells = (
            [f"{1e6 * cpu:,.0f}", f"{1e6 * plain_cpu:,.0f}", f"{100 * (cpu / plain_cpu - 1):+.1f}%"]
            if cpu and plain_cpu
            else ["n/a"] * 3  # no /proc to read the workers' CPU from
        )
        rows.append(
            [
                label,
                1 / statistics.median(per_batch[name]),
                1 / statistics.median(per_batch["plain"]),
                f"{100 * added:+.1f}%",
                *cpu_cells,
            ]
        )
    title = (
        f"DataLoader over an in-memory dataset ({ROWS}x{FEATURES} float32, batch {BATCH}, "
        f"{WORKERS} workers, main process {threads} threads, torch {torch.__version__}). "
        f"Batches/s over an epoch (median of {repeats} epochs). Baseline: the same loader with "
        "default_collate. Added wall time = time per batch / baseline time per batch - 1, the "
        "median over rounds of each round's pair (loaders take turns epoch by epoch) "
        f"(torch.ao: first {REFERENCE_ROWS} rows only). CPU: user + system time of the main "
        "process and both workers over all timed epochs, per batch. Batches handed over by "
        f"{args.sharing_strategy!r} (torch.multiprocessing sharing strategy)."
    )
    header = [
        "collate",
        "batches/s",
        "baseline batches/s",
        "added wall time",
        "CPU us/batch",
        "baseline CPU us/batch",
        "added CPU",
    ]
    print(table(title, header, rows))


if __name__ == "__main__":
    main()
