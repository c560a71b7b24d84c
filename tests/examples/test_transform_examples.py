"""The transform examples run as scripts and print what they promise."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_collate_hook(run_script):
    out = run_script(EXAMPLES / "collate_hook.py")
    assert out.count("kept 0.50") == 4
    assert "dropped features after re-fit: [4, 5, 6, 7, 8, 9, 10, 11]" in out


def test_hf_map(run_script):
    out = run_script(EXAMPLES / "hf_map.py")
    for line in (
        "features kept: True",
        "zeros: 0.50, dtype float32, labels kept: True",
        "same fingerprint on re-run: True",
        "cache reused: True",
        "every_batch on arrow, zeros: 0.75",
    ):
        assert line in out


def test_torchdata_nodes(run_script):
    out = run_script(EXAMPLES / "torchdata_nodes.py")
    assert "10 batches, identical to an uninterrupted run: True" in out
    assert "node state keys: ['source', 'transform']" in out


def test_hf_map_runs_on_datasets_before_4(tmp_path, run_script):
    """pyproject admits datasets>=2.19; `datasets.List` only exists from 4.0 on."""
    script = tmp_path / "old_datasets.py"
    script.write_text(
        "import runpy, sys\n"
        "import datasets\n"
        "del datasets.List  # as in datasets < 4\n"
        f"sys.argv = [{str(EXAMPLES / 'hf_map.py')!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = run_script(script)
    assert "features kept: True" in out and "zeros: 0.50, dtype float32" in out
