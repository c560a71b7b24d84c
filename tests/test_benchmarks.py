"""The benchmark scripts run in quick mode and print complete tables: a smoke test, so a change
that breaks `make bench` fails here. No timing is asserted (figures vary with the machine)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def table_rows(out: str) -> dict[str, list[str]]:
    """The data rows of the Markdown table in ``out``: first cell -> the other cells."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, out
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines), out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: row[1:] for row in cells}


def number(cell: str) -> float:
    """A figure as the scripts print it: ``7,393``, ``106x``, ``+21.8%``, ``54%``."""
    value = float(cell.replace(",", "").rstrip("x%"))
    assert math.isfinite(value), cell
    return value


def test_stream_prints_every_case_and_checks_the_masks(run_script):
    out = run_script(BENCHMARKS / "stream.py", "--quick", timeout=300)
    rows = table_rows(out)
    assert set(rows) == {
        f"{shape} {mode}"
        for shape in ("256x1024", "1024x4096")
        for mode in ("every batch", "frozen")
    }
    for cells in rows.values():
        assert all(number(c) > 0 for c in cells), cells
    assert "masks identical to torch.ao's: yes" in out


@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_loader_prints_wall_time_and_cpu_for_every_collate(strategy, run_script):
    out = run_script(
        BENCHMARKS / "loader.py", "--quick", "--sharing-strategy", strategy, timeout=300
    )
    rows = table_rows(out)
    assert list(rows) == [
        "SparsifyCollate, every batch",
        "SparsifyCollate, frozen",
        "bound: default_collate + in-place multiply by a ready mask",
        "torch.ao in collate_fn, every batch",
    ]
    for batches, baseline, added, cpu, baseline_cpu, added_cpu in rows.values():
        assert number(batches) > 0 and number(baseline) > 0
        number(added)
        if sys.platform.startswith("linux"):  # the workers' CPU is read from /proc
            assert number(cpu) > 0 and number(baseline_cpu) > 0
            number(added_cpu)
        else:
            assert cpu == baseline_cpu == added_cpu == "n/a"
    assert f"Batches handed over by {strategy!r}" in out


def test_shards_prints_the_copy_and_both_local_cases(run_script):
    rows = table_rows(run_script(BENCHMARKS / "shards.py", "--quick", "--no-ray", timeout=300))
    assert set(rows) == {
        "pyarrow read + write copy (baseline)",
        "preprocess, local, a mask per row",
        "preprocess, local, frozen mask (--state)",
    }
    for cells in rows.values():
        assert all(number(c) > 0 for c in cells), cells


def test_shards_share_of_copy_is_the_median_of_each_rounds_pair(monkeypatch, capsys):
    """'% of copy' pairs each case with the copy of the same round (as the README says of every
    ratio), so a slow spell of the machine that slows one round does not skew it."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("bench_shards", BENCHMARKS / "shards.py")
    shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shards)
    common = sys.modules["_common"]
    clock = [0.0]
    # seconds of each run: warm-up, then three rounds; the copy's slow round is per_row's fast one
    durations = {"copy": [1, 1, 2, 4], "per_row": [1, 2, 1, 8], "frozen": [1, 1, 2, 4]}

    def case(name):
        def run():
            clock[0] += durations[name].pop(0)

        return run

    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(shards, "write_shards", lambda folder: [])
    monkeypatch.setattr(shards, "fit", lambda *args, **kwargs: None)
    monkeypatch.setattr(shards, "copy_case", lambda paths, out, **kw: case("copy"))
    monkeypatch.setattr(
        shards,
        "preprocess_case",
        lambda paths, out, **kw: case("frozen" if "state" in kw else "per_row"),
    )
    shards.main(["--quick", "--no-ray"])
    rows = table_rows(capsys.readouterr().out)
    # pairs 1/2, 2/1, 4/8: median 50%; the ratio of the medians (2 / 2) would say 100%
    assert rows["preprocess, local, a mask per row"][2] == "50%"
    assert rows["preprocess, local, frozen mask (--state)"][2] == "100%"
    assert rows["pyarrow read + write copy (baseline)"][2] == "100%"
