import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipesparse.cli import main
from pipesparse.shards import read_sparse


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        table = pa.table(
            {
                "x": pa.array(
                    list(rng.normal(size=(10, 8)).astype(np.float32)), pa.list_(pa.float32())
                ),
                "name": [f"r{i}" for i in range(10)],
            }
        )
        pq.write_table(table, folder / f"s{index}.parquet")
    return folder


def _error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_preprocess_prints_a_summary_and_writes_shards(tmp_path, shards, capsys):
    argv = ["preprocess", str(shards), "--out", str(tmp_path / "o"), "--columns", "x",
            "--sparsifier", "norm", "--config", "sparsity_level=0.25", "sparse_block_shape=1,2",
            "--format", "coo", "--batch-rows", "3"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "2 shards -> " in out and "coo output" in out and ("smaller" in out or "larger" in out)
    assert err == ""  # stderr is not a terminal here: no progress bar
    zeros = read_sparse(tmp_path / "o" / "s1.parquet")["x"].eq(0).float().mean()
    assert zeros == 0.25


def test_progress_bar_on_a_terminal_and_quiet(tmp_path, shards, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    base = ["preprocess", str(shards), "--columns", "x", "--sparsifier", "threshold"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "shards 2/2" in terminal.getvalue() and "rows" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main([*base, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert terminal.getvalue() == ""
    assert "2 shards -> " in capsys.readouterr().out  # the summary line stays


def test_fit_inspect_and_plot(tmp_path, shards, capsys):
    state = tmp_path / "s.pt"
    assert (
        main(
            [
                "fit",
                str(shards),
                "--columns",
                "x",
                "--out",
                str(state),
                "--config",
                "sparsity_level=0.5",
            ]
        )
        == 0
    )
    assert "fitted x (8,) sparsity 50.0% on 20 rows" in capsys.readouterr().out
    assert main(["inspect", str(state), "--plot", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "fit state" in out and "sparsifier: norm" in out
    assert "mask 'batch' (column 'x'): shape (1, 8), kept 4, sparsity 50.0%" in out
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "preprocess",
                str(shards),
                "--out",
                str(tmp_path / "o"),
                "--columns",
                "x",
                "--state",
                str(state),
            ]
        )
        == 0
    )
    mask = torch.load(state, weights_only=True)["transform"]["sparsifier"]["state"]["batch"]["mask"]
    assert torch.equal(read_sparse(tmp_path / "o" / "s0.parquet")["x"].ne(0).any(0), mask[0])


def test_inspect_a_plain_sparsifier_state(tmp_path, capsys):
    from pipesparse import ThresholdSparsifier

    sparsifier = ThresholdSparsifier(threshold=0.5)
    sparsifier.add_data("emb", torch.tensor([[0.1, 0.9], [1.0, 0.2]]))
    sparsifier.step()
    torch.save(sparsifier.state_dict(), tmp_path / "t.pt")
    assert main(["inspect", str(tmp_path / "t.pt")]) == 0
    assert (
        "mask 'emb': shape (2, 2), kept 2, sparsity 50.0%, config {'threshold': 0.5}"
        in capsys.readouterr().out
    )


def test_bad_inputs_are_one_line_errors(tmp_path, shards, capsys):
    out = ["--out", str(tmp_path / "o")]
    base = ["preprocess", str(shards), *out, "--sparsifier", "norm"]
    assert "column 'nope': no such column" in _error(capsys, [*base, "--columns", "nope"])
    assert "column 'name': has type string" in _error(capsys, [*base, "--columns", "name"])
    assert "has no option level; accepted: sparsity_level" in _error(
        capsys, [*base, "--columns", "x", "--config", "level=1"]
    )
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot be read as a torch state" in _error(
        capsys,
        [
            "preprocess",
            str(shards),
            *out,
            "--columns",
            "x",
            "--sparsifier",
            "norm",
            "--state",
            str(tmp_path / "junk.pt"),
        ],
    )
    assert "does not exist" in _error(capsys, ["inspect", str(tmp_path / "none.pt")])
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [1.0, 2.0], [3.0]])}), ragged)
    message = _error(
        capsys,
        [
            "preprocess",
            str(ragged),
            "--out",
            str(tmp_path / "r"),
            "--columns",
            "x",
            "--sparsifier",
            "norm",
        ],
    )
    assert f"file {ragged}, column 'x', row 2: ragged row" in message
    assert not list((tmp_path / "r").glob("*.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 broken")
    assert "broken.parquet: cannot read the file" in _error(
        capsys,
        [
            "preprocess",
            str(tmp_path / "broken.parquet"),
            *out,
            "--columns",
            "x",
            "--sparsifier",
            "norm",
        ],
    )
    assert main([*base, "--columns", "x"]) == 0
    capsys.readouterr()
    assert "cannot be resumed: config was {}" in _error(
        capsys, [*base, "--columns", "x", "--config", "sparsity_level=0.9"]
    )


def test_module_and_console_script_are_the_same(tmp_path):
    script = shutil.which("pipesparse") or str(Path(sys.executable).parent / "pipesparse")
    for command in ([sys.executable, "-m", "pipesparse.cli"], [script]):
        shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and "demo" in shown.stdout and "preprocess" in shown.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "pipesparse.cli", "inspect", str(tmp_path / "none.pt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("pipesparse inspect: error: state file")


def test_a_fit_file_applies_to_its_own_columns_only(tmp_path, shards, capsys):
    state = str(tmp_path / "s.pt")
    assert main(["fit", str(shards), "--columns", "x", "--out", state, "--quiet"]) == 0
    base = ["preprocess", str(shards), "--out", str(tmp_path / "o"), "--state", state]
    pq.write_table(
        pa.table({"y": pa.array([[1.0] * 8] * 3, pa.list_(pa.float32()))}), tmp_path / "y.parquet"
    )
    other = ["preprocess", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "oy")]
    assert "has no mask for column 'y'" in _error(
        capsys, [*other, "--columns", "y", "--state", state]
    )
    assert main([*base, "--columns", "x", "--quiet"]) == 0


def test_corrupt_state_files_are_one_line_errors(tmp_path, shards, capsys):
    torch.save({"state": 5, "data_groups": {}}, tmp_path / "bad.pt")
    message = _error(capsys, ["inspect", str(tmp_path / "bad.pt")])
    assert "bad.pt: state is int 5, expected a dict" in message
    argv = ["preprocess", str(shards), "--out", str(tmp_path / "o"), "--columns", "x",
            "--sparsifier", "norm", "--state", str(tmp_path / "bad.pt")]  # fmt: skip
    assert "bad.pt: state is int 5, expected a dict" in _error(capsys, argv)


def test_fit_refuses_to_write_over_an_input_shard(shards, capsys):
    shard = shards / "s0.parquet"
    before = shard.read_bytes()
    for inputs in ([str(shard)], [str(shards)]):
        message = _error(capsys, ["fit", *inputs, "--columns", "x", "--out", str(shard)])
        assert f"input file {shard} is the output state file {shard}" in message
        assert "pass another --out" in message
    assert shard.read_bytes() == before


def test_inspect_describes_batch_masks_and_plots_to_the_file_it_names(tmp_path, capsys):
    from pipesparse.sparsifiers import DataNormSparsifier
    from pipesparse.transforms.core import SparsifyTransform

    transform = SparsifyTransform(DataNormSparsifier(), update="every_batch", mask_over="batch")
    transform(torch.randn(3, 8))
    torch.save(transform.state_dict(), tmp_path / "b.pt")
    assert main(["inspect", str(tmp_path / "b.pt"), "--plot", str(tmp_path / "masks")]) == 0
    out = capsys.readouterr().out
    assert "transform state" in out and "mask_over: batch" in out and "update: every_batch" in out
    assert "mask 'batch': shape (3, 8), kept 12, sparsity 50.0%" in out
    assert out.rstrip().endswith(f"plot: {tmp_path / 'masks.png'}")
    assert (tmp_path / "masks.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_errors_name_the_problem_in_one_line(tmp_path, capsys):
    torch.save({"format": "pipesparse.data_sparsifier/1", "state": {}}, tmp_path / "g.pt")
    assert "without its 'data_groups' key" in _error(capsys, ["inspect", str(tmp_path / "g.pt")])
    (tmp_path / "script.py").write_text("print('hi')\n")
    message = _error(capsys, ["inspect", str(tmp_path / "script.py")])
    assert f"state file {tmp_path / 'script.py'} cannot be read as a torch state" in message


def test_preprocess_state_dict_needs_the_rule_it_was_made_with(tmp_path, shards, capsys):
    from pipesparse.sparsifiers import DataNormSparsifier
    from pipesparse.transforms.core import SparsifyTransform

    transform = SparsifyTransform(
        DataNormSparsifier(sparsity_level=0.5), keys=["x"], update="frozen", mask_over="features"
    )
    transform.fit({"x": torch.randn(5, 8)})
    state = str(tmp_path / "tf.pt")
    torch.save(transform.state_dict(), state)
    base = ["preprocess", str(shards), "--out", str(tmp_path / "o"), "--columns", "x"]
    base += ["--state", state, "--quiet"]
    assert "--sparsifier is required with" in _error(capsys, base)
    message = _error(capsys, [*base, "--sparsifier", "threshold"])
    assert "the config of mask 'batch' (column 'x') in" in message
    assert "does not fit --sparsifier threshold (ThresholdSparsifier)" in message
    assert "pass the --sparsifier the state was made with (its config fits: norm)" in message
    assert main([*base, "--sparsifier", "norm"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    assert "also needs --sparsifier, the rule it was made with" in " ".join(
        capsys.readouterr().out.split()
    )
