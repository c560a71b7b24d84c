import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as Reference

from pipesparse.shards.columns import ColumnSpec, to_tensor
from pipesparse.shards.job import BatchProcessor, Job


def _table(rows: int, seed: int = 0) -> pa.Table:
    gen = torch.Generator().manual_seed(seed)
    vec = torch.randn(rows, 8, generator=gen)
    img = torch.randn(rows, 4, 4, generator=gen, dtype=torch.float64)
    return pa.table(
        {
            "id": list(range(rows)),
            "vec": pa.array(vec.tolist(), pa.list_(pa.float32())),
            "img": pa.array(img.tolist(), pa.list_(pa.list_(pa.float64()))),
        }
    )


SPECS = [ColumnSpec("vec", (8,), "t"), ColumnSpec("img", (4, 4), "t")]


def _decoded(table: pa.Table) -> dict[str, torch.Tensor]:
    return {s.name: to_tensor(table.column(s.name), s, "t", 0) for s in SPECS}


@pytest.mark.parametrize("block", [(1, 4), (2, 2)])
def test_per_row_masks_match_the_reference_on_each_row_alone(block):
    config = {"sparsity_level": 0.5, "sparse_block_shape": block}
    table = _table(6)
    out = _decoded(BatchProcessor(Job("norm", config, SPECS))(table, "t"))
    original = _decoded(table)
    for name in ("vec", "img"):
        for row in range(6):
            data = original[name][row].reshape(-1, original[name].shape[-1]).float()
            reference = Reference(**config)
            reference.add_data("r", data.clone())
            reference.step()
            expected = data * reference.get_mask("r")
            assert torch.equal(out[name][row].float().reshape(expected.shape), expected)


@given(cut=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_batch_boundaries_never_change_results(cut, seed):
    table = _table(12, seed)
    job = Job("norm", {"sparsity_level": 0.5}, SPECS)
    whole = BatchProcessor(job)(table, "t")
    processor, parts, start = BatchProcessor(job), [], 0
    for size in cut * 12:
        if start >= 12:
            break
        parts.append(processor(table.slice(start, size), "t", start))
        start += size
    assert pa.concat_tables(parts).equals(whole)


def test_pass_through_columns_and_order_are_kept():
    table = _table(5)
    out = BatchProcessor(Job("threshold", {"threshold": 0.5}, SPECS))(table, "t")
    assert out.column_names == ["id", "vec", "img"]
    assert out.column("id").equals(table.column("id"))
    assert out.schema.field("img").type == table.schema.field("img").type
    decoded = _decoded(out)["vec"]
    original = _decoded(table)["vec"]
    assert torch.equal(decoded, torch.where(original.abs() >= 0.5, original, 0.0))


def test_zeros_are_positive_zero():
    table = pa.table({"vec": pa.array([[-1.0, -2.0, -3.0, -4.0, 5.0, 6.0, 7.0, 8.0]])})
    out = BatchProcessor(Job("norm", {"sparsity_level": 0.5}, [ColumnSpec("vec", (8,), "t")]))(
        table, "t"
    )
    assert out.column("vec").to_pylist() == [[0.0] * 4 + [5.0, 6.0, 7.0, 8.0]]
    assert not torch.tensor(out.column("vec").to_pylist()[0]).signbit().any()


def test_nm_rows_and_integer_columns():
    table = pa.table({"v": pa.array([[1, -5, 3, 2, 0, 0, 9, 1]], pa.list_(pa.int32()))})
    out = BatchProcessor(Job("nm", {"n": 2, "m": 4}, [ColumnSpec("v", (8,), "t")]))(table, "t")
    assert out.schema.field("v").type == pa.list_(pa.int32())
    assert out.column("v").to_pylist() == [[0, -5, 3, 0, 0, 0, 9, 1]]


def test_bad_config_fails_when_the_job_is_built():
    with pytest.raises(ValueError, match="sparsity_level must be a number"):
        Job("norm", {"sparsity_level": "half"}, SPECS)
    with pytest.raises(ValueError, match="unknown output format 'csv'"):
        Job("norm", {}, SPECS, out_format="csv")
