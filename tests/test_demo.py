import subprocess
import sys

import torch

from pipesparse.cli import main


def test_demo_runs_the_whole_job(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "wrote 1797 scikit-learn digits" in text
    assert "fitted image (8, 8) sparsity 50.0% on 1797 rows" in text
    assert "size: dense" in text and "coo" in text and "rows/s" in text
    for name in ("masks.png", "samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "frozen_coo").glob("*.parquet")) == [
        f"digits-{i:02d}.parquet" for i in range(4)
    ]
    state = torch.load(out / "masks.pt", weights_only=True)
    assert state["rows"] == 1797 and state["columns"] == {"image": [8, 8]}


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(tmp_path)]) == 1
    assert "holds files the demo did not write (['thesis.tex'])" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_demo_never_deletes_files_inside_its_own_folders(tmp_path, capsys):
    out = tmp_path / "myproj"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    (out / "shards" / "my_data.parquet").write_text("precious")
    (out / "frozen_coo" / "digits-00.parquet").unlink()
    (out / "frozen_coo" / "digits-00.parquet").mkdir()  # a demo file name, but a folder
    (out / "frozen_coo" / "digits-00.parquet" / "notes.txt").write_text("precious")
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "frozen_coo/digits-00.parquet" in err and "shards/my_data.parquet" in err
    assert (out / "shards" / "my_data.parquet").read_text() == "precious"
    assert (out / "frozen_coo" / "digits-00.parquet" / "notes.txt").read_text() == "precious"
    assert (out / "masks.pt").exists()  # nothing was deleted


def test_demo_replaces_its_own_output_and_leftovers_of_a_killed_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    (out / "per_row_coo" / ".pipesparse-digits-01.parquet.123.tmp").write_bytes(b"half")
    (out / "frozen_coo" / "digits-02.parquet").unlink()
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert not list(out.rglob(".pipesparse-*.tmp"))
    assert (out / "frozen_coo" / "digits-02.parquet").exists()


_COUNT_COMPILES = """
import sys
import numba
import pipesparse.demo as demo
from pipesparse.sparsifiers import _norm_kernel

def loaded():
    kernels = vars(_norm_kernel).values()
    return sum(len(k.overloads) for k in kernels if isinstance(k, numba.core.dispatcher.Dispatcher))

real = demo.preprocess
def counting(*args, **kwargs):
    before = loaded()
    summary = real(*args, **kwargs)
    print("kernels loaded during", args[1].name, loaded() - before, file=sys.stderr)
    return summary

demo.preprocess = counting
demo.run_demo(sys.argv[1], quiet=True)
"""


def test_demo_compiles_the_kernel_before_it_times_the_per_row_run(tmp_path):
    """On a fresh install numba compiles the per-row kernel (20 s on 2 cores): inside the timed
    run it made the demo print about 80 rows/s. A fresh process shows it: the kernel is not
    loaded before the per-row job is built, which the demo must do before the timed run."""
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_COMPILES, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "kernels loaded during per_row_coo 0" in done.stderr, done.stderr
