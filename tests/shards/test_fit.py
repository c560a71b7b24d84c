import pytest
import torch

from pipesparse.shards.columns import ColumnSpec, to_tensor
from pipesparse.shards.fit import fit, fit_report
from pipesparse.shards.inputs import discover_shards
from pipesparse.sparsifiers.norm import norm_keep_mask

CONFIG = {"sparsity_level": 0.5, "sparse_block_shape": (2, 2)}


def _all_rows(folder, name, shape):
    spec = ColumnSpec(name, shape, "f")
    return torch.cat(
        [
            to_tensor(b.column(name), spec, "f", 0)
            for s in discover_shards([str(folder)])
            for b in s.iter_batches(7)
        ]
    )


def test_masks_are_the_rule_on_mean_abs_over_all_rows(tmp_path, shards_dir):
    state = fit(
        [str(shards_dir)], "img,vec", tmp_path / "s.pt", "norm", CONFIG, batch_rows=7, quiet=True
    )
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["format"] == "pipesparse.fit/1" and loaded["rows"] == 60
    assert loaded["columns"] == {"img": [4, 4], "vec": [8]}
    assert loaded["config"] == {"sparsity_level": 0.5, "sparse_block_shape": [2, 2]}
    masks = loaded["transform"]["sparsifier"]["state"]
    for name, shape in (("img", (4, 4)), ("vec", (8,))):
        summary = _all_rows(shards_dir, name, shape).abs().double().mean(dim=0, keepdim=True)
        expected = norm_keep_mask(summary, 0.5, (2, 2), None)
        assert torch.equal(masks[f"batch_{name}"]["mask"], expected)
    assert state["rows"] == 60
    assert "img (4, 4) sparsity 50.0%" in fit_report(state, "s.pt")


def test_bad_config_or_column_writes_nothing(tmp_path, shards_dir):
    with pytest.raises(ValueError, match="has no option level"):
        fit([str(shards_dir)], "vec", tmp_path / "s.pt", "norm", {"level": 1})
    with pytest.raises(ValueError, match="column 'nope'"):
        fit([str(shards_dir)], "nope", tmp_path / "s.pt")
    assert list(tmp_path.iterdir()) == [shards_dir]


def test_no_rows_is_an_error(tmp_path, make_shards):
    make_shards(tmp_path / "in", shards=1, rows=0)
    with pytest.raises(ValueError):
        fit([str(tmp_path / "in")], "fixed", tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


def test_out_that_is_an_input_shard_is_refused(tmp_path, make_shards):
    paths = make_shards(tmp_path / "in", shards=2)
    before = [p.read_bytes() for p in paths]
    (tmp_path / "link.parquet").symlink_to(paths[0])
    for inputs, out in (
        ([str(paths[0])], paths[0]),  # the file itself
        ([str(tmp_path / "in")], paths[1]),  # a shard found in a folder input
        ([str(tmp_path / "in")], tmp_path / "in" / ".." / "in" / paths[0].name),
        ([str(tmp_path / "in")], tmp_path / "link.parquet"),  # a link to a shard
    ):
        with pytest.raises(ValueError, match=r"input file .* is the output state file .*--out"):
            fit(inputs, "vec", out, quiet=True)
    assert [p.read_bytes() for p in paths] == before


@pytest.mark.parametrize("batch_rows", [0, -1, 2.5, "8", True])
def test_bad_batch_rows_is_named_like_preprocess_names_it(tmp_path, shards_dir, batch_rows):
    """fit passed batch_rows on to pyarrow: 'batch_size must be greater than zero', or a
    TypeError about comparing str and int; True read one row at a time."""
    with pytest.raises(ValueError, match=f"batch_rows must be an int >= 1, got {batch_rows!r}"):
        fit([str(shards_dir)], "vec", tmp_path / "s.pt", batch_rows=batch_rows, quiet=True)
    assert not (tmp_path / "s.pt").exists()


def test_one_input_may_be_a_string_or_a_path(tmp_path, shards_dir):
    """A str was iterated character by character ('file t: no such file or directory',
    after searching the folder '/'), a Path was 'not iterable'."""
    from pipesparse.shards import preprocess

    for index, inputs in enumerate((str(shards_dir), shards_dir)):
        state = fit(inputs, "vec", tmp_path / f"s{index}.pt", quiet=True)
        assert state["rows"] == 60
        summary = preprocess(inputs, tmp_path / f"o{index}", "vec", "norm", quiet=True)
        assert summary.rows == 60
