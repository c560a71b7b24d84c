"""Streaming sparsification: SparsifyTransform vs torch.ao's data sparsifier vs the bound.

    python benchmarks/stream.py            # the README table (about a minute on 2 cores)
    python benchmarks/stream.py --quick    # fewer repeats, no 10,000-batch memory run
    python benchmarks/stream.py --profile  # where an every-batch step spends its time, by phase

Each case consumes its own iterator over one pool of distinct float32 batches (more bytes than
the last-level cache holds, so every batch comes from memory, as in a real stream). The bound
is ``batch * mask`` with a ready float32 mask of the batch's shape: what the masked view costs
at the least, in the dtype the library stores masks in (the data's). Rule: DataNormSparsifier,
L1 norm, 1x4 blocks, sparsity 0.5.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import THREADS, paired_ratio, round_times, rss_mb, setup_threads, table  # noqa: E402

from pipesparse import DataNormSparsifier  # noqa: E402
from pipesparse.transforms import SparsifyTransform  # noqa: E402

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "norm": "L1"}
SHAPES = ((256, 1024), (1024, 4096))
POOL_BYTES = 256 * 2**20
MEMORY_BATCHES = 10_000


def batch_pool(shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    count = max(4, POOL_BYTES // (shape[0] * shape[1] * 4))
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def runner(step, pool: list[torch.Tensor], batches: int):
    """A case: ``step(batch)`` on the next ``batches`` batches of a private cycle of the pool."""
    stream = itertools.cycle(pool)

    def run() -> None:
        for batch in itertools.islice(stream, batches):
            step(batch)

    run.batches = batches
    return run


def reference_step(update: bool):
    ref = RefNorm(**CONFIG)

    def step(batch: torch.Tensor) -> torch.Tensor:
        ref.add_data("batch", batch)
        if update:
            ref.step()
        return ref.get_data("batch", return_original=False)

    return ref, step


def same_masks_as_reference(pool: list[torch.Tensor]) -> bool:
    """The masks the benchmark computes are torch.ao's, bit for bit (checked on two batches)."""
    ref, ref_step = reference_step(update=True)
    transform = SparsifyTransform(DataNormSparsifier(**CONFIG))
    for batch in pool[:2]:
        ours, theirs = transform(batch), ref_step(batch)
        if not torch.equal(ours, theirs) or not torch.equal(
            transform.sparsifier.get_mask("batch"), ref.get_mask("batch").to(torch.float32)
        ):
            return False
    return True


def measure_shape(shape: tuple[int, int], repeats: int) -> tuple[list[list[object]], bool]:
    pool = batch_pool(shape)
    elements = shape[0] * shape[1]
    # batches per timed run, the same for the bound and both modes: a run's first batch finds
    # the caches cold (the other cases ran in between), and its cost is shared by the run
    fast = max(8, 2**24 // elements)
    slow = max(1, 2**18 // elements)

    every = SparsifyTransform(DataNormSparsifier(**CONFIG))
    frozen = SparsifyTransform(DataNormSparsifier(**CONFIG), update="frozen", mask_over="batch")
    frozen.fit(pool[0])
    ready_mask = frozen.sparsifier.get_mask("batch").clone()
    _, ref_every = reference_step(update=True)
    ref_frozen_sparsifier, ref_frozen = reference_step(update=False)
    ref_frozen_sparsifier.add_data("batch", pool[0])
    ref_frozen_sparsifier.step()

    cases = {
        "bound": runner(lambda b: b * ready_mask, pool, fast),
        "every": runner(every, pool, fast),
        "frozen": runner(frozen, pool, fast),
        "ref_every": runner(ref_every, pool, slow),
        "ref_frozen": runner(ref_frozen, pool, slow),
    }
    times = round_times(cases, repeats)
    per_batch = {name: [t / cases[name].batches for t in times[name]] for name in cases}
    median = {name: statistics.median(values) for name, values in per_batch.items()}
    label = f"{shape[0]}x{shape[1]}"
    gigabytes = elements * 4 / 1e9
    rows = []
    for mode, ours, ref in (
        ("every batch", "every", "ref_every"),
        ("frozen", "frozen", "ref_frozen"),
    ):
        rows.append(
            [
                f"{label} {mode}",
                1 / median[ours],
                1 / median[ref],
                1 / median["bound"],
                f"{paired_ratio(per_batch[ref], per_batch[ours]):.0f}x",
                f"{paired_ratio(per_batch[ours], per_batch['bound']):.2f}x",
                gigabytes / median[ours],
            ]
        )
    return rows, same_masks_as_reference(pool)


def memory_growth(batches: int) -> tuple[float, float]:
    """RSS (MB) after a warm-up and its growth over ``batches`` more every-batch transforms."""
    pool = batch_pool((256, 1024), seed=1)[:64]
    transform = SparsifyTransform(DataNormSparsifier(**CONFIG))
    for batch in pool * 4:
        transform(batch)
    before = rss_mb()
    for batch in itertools.islice(itertools.cycle(pool), batches):
        transform(batch)
    return before, rss_mb() - before


def profile_every_batch(shape: tuple[int, int]) -> str:
    """Where an every-batch step's time goes (median microseconds per batch over the batch
    stream, each part on a batch from memory): a whole transform call, the CPU kernel as the
    transform calls it (mask and masked batch in its two passes, a band of rows on each of
    torch's threads), the same on one thread, the kernel writing the mask only, and the bound;
    then the kernel's phases one by one on one thread on a batch in cache, and the bound's
    multiply on one thread. Share = of a whole transform call."""
    from pipesparse.sparsifiers import _norm_kernel as kernel

    pool = batch_pool(shape)
    transform = SparsifyTransform(DataNormSparsifier(**CONFIG))
    mask, out = torch.ones(shape), torch.empty(shape)
    k = round(CONFIG["sparsity_level"] * shape[0] * shape[1] // 4)
    buf = kernel._buffers(*shape, torch.float32, (1, 4))
    sums = np.empty(buf.keys.shape[1], dtype=np.float32)  # one row of block sums
    rows = buf.keys.shape[0]
    found = {}

    def keys_pass(batch):
        found["keys"] = kernel._keys_band(batch.numpy(), False, 1, 4, buf, 0, rows, sums)

    def selection(batch):
        found["threshold"] = kernel._threshold(buf, k, *found["keys"])

    def write_pass(product):
        def run(batch):
            x = batch.numpy()
            target = out.numpy() if product else None
            threshold = found["threshold"]
            kernel._write_band(1, 4, buf.keys, 0, rows, *threshold, mask.numpy(), x, target, False)

        return run

    def kernel_call(product):
        def run(batch):
            kernel.write_mask(batch[None], mask, k, (1, 4), 4, "L1", out[None] if product else None)

        return run

    bands = kernel._bands

    def kernel_one_thread(batch):
        kernel._bands = lambda height, width: 1
        try:
            kernel.write_mask(batch[None], mask, k, (1, 4), 4, "L1", out[None])
        finally:
            kernel._bands = bands

    phases = {
        "whole transform call": transform,
        "kernel as the transform runs it (mask and masked batch)": kernel_call(True),
        "the same on one thread (no bands)": kernel_one_thread,
        "kernel writing the mask only": kernel_call(False),
        "masked view (batch * mask: the bound)": lambda batch: batch * mask,
        "kernel phase, one thread, in cache: keys pass": keys_pass,
        "kernel phase, one thread, in cache: exact k-th key": selection,
        "kernel phase, one thread, in cache: write pass (mask and masked batch)": write_pass(True),
        "kernel phase, one thread, in cache: write pass (mask only)": write_pass(False),
    }
    times: dict[str, list[float]] = {name: [] for name in phases}
    for batch in pool[:4]:
        for step in phases.values():
            step(batch)
    for i, batch in enumerate(pool):
        for j, (name, step) in enumerate(phases.items()):  # each from memory: another batch
            other = pool[(i + j * len(pool) // len(phases)) % len(pool)]
            start = time.perf_counter()
            step(batch if name.startswith("kernel phase") else other)
            times[name].append(time.perf_counter() - start)
    us = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    # one core's multiply: what one core streams (the phases above run on one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_core = []
    for batch in pool:
        start = time.perf_counter()
        batch * mask
        one_core.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    us["masked view on one thread (what one core streams)"] = statistics.median(one_core) * 1e6
    whole = us["whole transform call"]
    rows_out = [[name, value, f"{value / whole:.0%}"] for name, value in us.items()]
    title = f"{shape[0]}x{shape[1]} every batch: median us per batch"
    return table(title, ["phase", "us/batch", "share"], rows_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, no memory run")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    parser.add_argument(
        "--profile", action="store_true", help="time per phase of an every-batch step, no table"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # torch.ao warns on every re-registration
    threads = setup_threads(args.threads)
    if args.profile:
        print("\n\n".join(profile_every_batch(shape) for shape in SHAPES))
        return
    rows, identical = [], []
    for shape in SHAPES:
        shape_rows, same = measure_shape(shape, repeats=3 if args.quick else 7)
        rows += shape_rows
        identical.append(same)
    title = (
        f"Streaming DataNormSparsifier (L1, 1x4 blocks, sparsity 0.5) through SparsifyTransform, "
        f"float32, torch {torch.__version__}, {threads} threads. Batches/s (median of repeats). "
        "torch.ao: the same loop (add_data, step, masked get_data; frozen: no step). Bound: "
        "batch * ready float32 mask (the mask dtype pipesparse stores), same batch stream. "
        "'x bound' = pipesparse time / bound time. Ratios: median over rounds of each round's pair "
        "(cases take turns)."
    )
    header = ["case", "pipesparse", "torch.ao", "bound", "vs torch.ao", "x bound", "GB/s"]
    print(table(title, header, rows))
    print(f"\nmasks identical to torch.ao's: {'yes' if all(identical) else 'NO'}")
    if not args.quick:
        before, growth = memory_growth(MEMORY_BATCHES)
        print(
            f"memory: RSS {before:.0f} MB after warm-up, {growth:+.1f} MB after "
            f"{MEMORY_BATCHES:,} more 256x1024 every-batch transforms"
        )


if __name__ == "__main__":
    main()
