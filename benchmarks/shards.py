"""Offline `preprocess` throughput vs a plain pyarrow copy of the same shards; Ray scaling.

    python benchmarks/shards.py            # the README table (a minute or two on 2 cores)
    python benchmarks/shards.py --quick    # fewer repeats, Ray with 1 worker only
    python benchmarks/shards.py --no-ray   # local engine only

Parquet shards with a ``list<float32>`` column (random values, so they barely compress) and an
id column. The baseline reads each shard with pyarrow and writes it back unchanged
(``pq.read_table`` + ``pq.write_table``, pyarrow's defaults: snappy, dictionary encoding with
fallback to plain), the options ``preprocess`` writes with. ``preprocess`` runs the whole job: checksums, atomic writes, the manifest. Rule: DataNormSparsifier, L1, 1x4 blocks,
sparsity 0.5, every row its own mask (no --state) or one frozen mask from ``fit`` (--state).
Ray runs once per worker count over all shards, after an untimed warm-up run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import THREADS, paired_ratio, round_times, setup_threads, table  # noqa: E402

from pipesparse.shards.fit import fit  # noqa: E402
from pipesparse.shards.preprocess import preprocess  # noqa: E402

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "norm": "L1"}
SHARDS, ROWS, FEATURES = 4, 8192, 512
BATCH_ROWS = 8192  # preprocess's default


def write_shards(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(SHARDS):
        values = torch.randn(ROWS * FEATURES, generator=generator).numpy()
        column = pa.ListArray.from_arrays(
            pa.array(range(0, (ROWS + 1) * FEATURES, FEATURES), pa.int32()), pa.array(values)
        )
        ids = pa.array(range(index * ROWS, (index + 1) * ROWS), pa.int64())
        path = folder / f"part-{index:03d}.parquet"
        pq.write_table(pa.table({"id": ids, "x": column}), path)
        paths.append(str(path))
    return paths


def copy_case(paths: list[str], out: Path, **options):
    """Read each shard whole and write it back; ``options`` go to ``pq.write_table``."""

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for path in paths:
            table = pq.read_table(path)
            pq.write_table(table, out / Path(path).name, **options)

    return run


def preprocess_case(paths: list[str], out: Path, **options):
    """A fresh run each time: an output folder that is already complete would be skipped."""

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        summary = preprocess(paths, out, "x", quiet=True, batch_rows=BATCH_ROWS, **options)
        assert summary.skipped == 0 and summary.rows == len(paths) * ROWS, summary

    return run


def ray_case(paths: list[str], out: Path, workers: int):
    return preprocess_case(
        paths, out, sparsifier="norm", config=CONFIG, engine="ray", workers=workers
    )


def timed(run) -> float:
    """Seconds of one run (the Ray cases, start-up included as a user sees it)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, Ray: 1 worker")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    repeats = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="pipesparse-bench-"))
    try:
        paths = write_shards(work / "in")
        state = work / "masks.pt"
        fit(paths, "x", state, sparsifier="norm", config=CONFIG, quiet=True)
        cases = {
            "copy": copy_case(paths, work / "copy"),
            "per_row": preprocess_case(paths, work / "per_row", sparsifier="norm", config=CONFIG),
            "frozen": preprocess_case(paths, work / "frozen", state=str(state)),
        }
        rounds = round_times(cases, repeats)
        seconds = {name: statistics.median(values) for name, values in rounds.items()}
        # each case against the copy of the same round, as every ratio of these scripts
        share = {name: paired_ratio(rounds["copy"], values) for name, values in rounds.items()}
        if not args.no_ray:
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # C++ warnings on stderr
            import ray

            ray.init(
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
            import ray.data  # noqa: F401  (sets up its loggers, quieted next)

            for logger in ("ray", "ray.data"):
                logging.getLogger(logger).setLevel(logging.ERROR)
            try:  # untimed: the first Ray Data run of a process also sets Ray Data up
                ray_case(paths[:1], work / "ray_warmup", 1)()
                for workers in (1,) if args.quick else (1, 2):
                    seconds[f"ray{workers}"] = timed(
                        ray_case(paths, work / f"ray{workers}", workers)
                    )
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    megabytes = SHARDS * ROWS * FEATURES * 4 / 1e6
    labels = {
        "copy": "pyarrow read + write copy (baseline)",
        "per_row": "preprocess, local, a mask per row",
        "frozen": "preprocess, local, frozen mask (--state)",
        "ray1": "preprocess, ray, 1 worker, a mask per row",
        "ray2": "preprocess, ray, 2 workers, a mask per row",
    }
    rows = [
        [
            labels[name],
            SHARDS * ROWS / seconds[name],
            megabytes / seconds[name],
            f"{share.get(name, seconds['copy'] / seconds[name]):.0%}",
        ]
        for name in labels
        if name in seconds
    ]
    if "ray1" in seconds and "ray2" in seconds:
        rows.append(
            [
                "ray scaling, 2 workers / 1 worker",
                "",
                "",
                f"{seconds['ray1'] / seconds['ray2']:.2f}x",
            ]
        )
    title = (
        f"Offline preprocess of {SHARDS} Parquet shards ({ROWS} rows x {FEATURES} float32 each, "
        f"{megabytes:.0f} MB of values), batch {BATCH_ROWS} rows, torch {torch.__version__}, "
        f"{threads} threads. Median of runs (Ray: one run of each, start-up of "
        "its dataset and actors included, after an untimed warm-up run). '% of copy' = copy time "
        "/ case time, the median over rounds of each round's pair (cases take turns; Ray: its "
        "one run against the median copy): throughput relative to the baseline. The baseline "
        "is a plain copy: pq.read_table + pq.write_table with pyarrow's defaults (snappy, "
        "dictionary encoding), as preprocess writes."
    )
    print(table(title, ["case", "rows/s", "MB/s", "% of copy"], rows))


if __name__ == "__main__":
    main()
