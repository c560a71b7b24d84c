"""Timing and table helpers shared by the benchmark scripts (not part of the package).

Every script measures its cases side by side in one run: each repeat runs every case once, in
turn, so a neighbour process slowing the machine slows all of them alike, and the figure kept
is the median of the repeats (after one warm-up round per case).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

THREADS = 2  # the machine the goals are stated for: 2 CPU cores


def setup_threads(threads: int = THREADS) -> int:
    """Pin torch's intra-op threads so runs on bigger machines stay comparable."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def round_times(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each case in each round; every round runs each case once, in turn."""
    for run in cases.values():  # warm-up: first-call costs, allocator, caches
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of one case's time over another's in the same round: a slow spell of
    the machine slows both sides of a pair, so this moves less than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc; None where
    unavailable): what a DataLoader's worker processes spend, which the main process cannot
    time itself."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table under a title line, ready to paste into the README."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, ""]
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)
