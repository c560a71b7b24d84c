import pytest
import torch

from pipesparse.errors import CorruptStateError
from pipesparse.shards.columns import ColumnSpec
from pipesparse.shards.state import describe_state, load_state_file, transform_state_for
from pipesparse.sparsifiers import DataNormSparsifier
from pipesparse.transforms.core import SparsifyTransform

SPECS = [ColumnSpec("a", (4,), "f"), ColumnSpec("b", (2, 2), "f")]


def _sparsifier_state(shape_a=(4,)):
    sparsifier = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    sparsifier.add_data("a", torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(shape_a))
    sparsifier.add_data("b", torch.tensor([[1.0, 5.0], [2.0, 1.0]]))
    sparsifier.step()
    return sparsifier.state_dict()


def test_sparsifier_state_named_after_columns():
    state = transform_state_for(_sparsifier_state(), "s.pt", SPECS)
    masks = state["sparsifier"]["state"]
    assert masks["batch_a"]["mask"].tolist() == [[False, False, True, True]]
    assert masks["batch_b"]["mask"].shape == (1, 2, 2)
    transform = SparsifyTransform(
        DataNormSparsifier(), keys=["a", "b"], update="frozen", mask_over="features"
    )
    transform.load_state_dict(state)
    out = transform({"a": torch.ones(3, 4), "b": torch.ones(3, 2, 2)})
    assert out["a"].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3


def test_transform_state_is_accepted():
    transform = SparsifyTransform(
        DataNormSparsifier(), keys=["a", "b"], update="frozen", mask_over="features"
    )
    transform.fit({"a": torch.randn(5, 4), "b": torch.randn(5, 2, 2)})
    state = transform_state_for(transform.state_dict(), "s.pt", SPECS)
    assert torch.equal(
        state["sparsifier"]["state"]["batch_a"]["mask"],
        transform.state_dict()["sparsifier"]["state"]["batch_a"]["mask"],
    )


def test_batch_masks_and_mismatches_are_refused():
    per_batch = SparsifyTransform(DataNormSparsifier(), update="frozen", mask_over="batch")
    per_batch(torch.randn(3, 4))
    with pytest.raises(CorruptStateError, match="mask_over='batch' masks"):
        transform_state_for(per_batch.state_dict(), "s.pt", SPECS[:1])
    with pytest.raises(CorruptStateError, match=r"no mask for column 'c'.*it has: \['a', 'b'\]"):
        transform_state_for(_sparsifier_state(), "s.pt", [ColumnSpec("c", (4,), "f")])
    with pytest.raises(CorruptStateError, match=r"mask 'a' has shape \(2, 2\); rows of column 'a'"):
        transform_state_for(_sparsifier_state((2, 2)), "s.pt", SPECS)
    with pytest.raises(CorruptStateError, match="has format 'x'"):
        transform_state_for({"format": "x"}, "s.pt", SPECS)


def test_load_state_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_state_file(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CorruptStateError, match="cannot be read as a torch state"):
        load_state_file(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CorruptStateError, match="holds a list"):
        load_state_file(tmp_path / "list.pt")


def test_describe():
    described = describe_state(_sparsifier_state(), "s.pt")
    assert described["header"] == {"kind": "sparsifier"}
    entry = described["masks"]["a"]
    assert entry["shape"] == (4,) and entry["kept"] == 2 and entry["sparsity"] == 0.5
    assert entry["config"]["sparse_block_shape"] == (1, 2)
