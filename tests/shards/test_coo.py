import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesparse.shards.coo import METADATA_KEY, coo_type, decode, encode, read_sparse
from pipesparse.shards.preprocess import preprocess


@given(
    rows=st.integers(0, 6),
    shape=st.sampled_from([(5,), (2, 3), (1, 4)]),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_encode_decode_round_trip(rows, shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, *shape, generator=gen)
    dense = dense * (torch.rand(rows, *shape, generator=gen) < density)
    dense = dense.masked_fill(dense == 0, 0)
    encoded = encode(dense, pa.float32())
    assert encoded.type == coo_type(pa.float32())
    assert torch.equal(decode(encoded, shape, torch.float32), dense)
    stored = sum(len(v) for v in encoded.field("values").to_pylist()) if rows else 0
    assert stored == int(dense.ne(0).sum())


def test_coo_row_layout_is_documented_one():
    encoded = encode(torch.tensor([[0.0, 2.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]), pa.float32())
    assert encoded.to_pylist() == [
        {"indices": [1, 3], "values": [2.5, -1.0]},
        {"indices": [], "values": []},
    ]


def test_nan_is_stored_and_restored():
    dense = torch.tensor([[float("nan"), 0.0, 1.0]])
    back = decode(encode(dense, pa.float64()), (3,), torch.float64)
    assert back[0, 0].isnan() and back[0, 1:].tolist() == [0.0, 1.0]


def test_read_sparse_gives_same_bytes_for_dense_and_coo(tmp_path, shards_dir):
    for fmt in ("dense", "coo"):
        preprocess(
            [str(shards_dir)], tmp_path / fmt, "vec,img,fixed", "norm", out_format=fmt, quiet=True
        )
    dense = read_sparse(tmp_path / "dense" / "part-00.parquet")
    coo = read_sparse(tmp_path / "coo" / "part-00.parquet")
    assert set(dense) == {"vec", "img", "fixed"}
    for name in dense:
        assert dense[name].dtype == coo[name].dtype
        assert dense[name].numpy().tobytes() == coo[name].numpy().tobytes()
    assert dense["img"].dtype == torch.float64 and dense["img"].shape == (20, 4, 4)
    schema = pq.read_schema(tmp_path / "coo" / "part-00.parquet")
    meta = json.loads(schema.metadata[METADATA_KEY])
    assert meta == {
        "format": "coo",
        "columns": {
            "vec": {"shape": [8], "dtype": "float"},
            "img": {"shape": [4, 4], "dtype": "double"},
            "fixed": {"shape": [8], "dtype": "float"},
        },
    }
    assert schema.field("img").type == coo_type(pa.float64())
    assert schema.field("label").type == pa.string()


def test_read_sparse_picks_columns_and_rejects_others(tmp_path, shards_dir):
    preprocess([str(shards_dir)], tmp_path / "o", "vec", "threshold", quiet=True)
    path = tmp_path / "o" / "part-01.parquet"
    assert list(read_sparse(path, ["vec"])) == ["vec"]
    with pytest.raises(ValueError, match=r"\['label'\] are not sparsified columns"):
        read_sparse(path, ["label"])


def test_read_sparse_refuses_a_foreign_file(shards_dir):
    with pytest.raises(ValueError, match="not written by pipesparse"):
        read_sparse(shards_dir / "part-00.parquet")


def test_read_sparse_takes_columns_as_a_string_like_preprocess(tmp_path, shards_dir):
    """A str was iterated character by character: "['v', 'e', 'c'] are not sparsified"."""
    preprocess([str(shards_dir)], tmp_path / "o", "vec,img", "threshold", quiet=True)
    path = tmp_path / "o" / "part-01.parquet"
    assert list(read_sparse(path, "vec")) == ["vec"]
    assert list(read_sparse(path, "img,vec")) == ["img", "vec"]
    with pytest.raises(ValueError, match=r"\['label'\] are not sparsified columns"):
        read_sparse(path, "label")


def test_decode_refuses_coo_rows_it_would_misplace():
    """An index past the row's end was written into the next row, and values paired with
    another row's indices were placed silently."""
    out_of_range = pa.StructArray.from_arrays(
        [pa.array([[4], []], pa.list_(pa.int32())), pa.array([[1.0], []], pa.list_(pa.float32()))],
        fields=list(coo_type(pa.float32())),
    )
    with pytest.raises(ValueError, match=r"row 0 has index 4, outside 0 \.\. 3 for shape \(4,\)"):
        decode(out_of_range, (4,), torch.float32)
    unpaired = pa.StructArray.from_arrays(
        [
            pa.array([[0, 1], [2]], pa.list_(pa.int32())),
            pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float32())),
        ],
        fields=list(coo_type(pa.float32())),
    )
    with pytest.raises(ValueError, match="row 0 has 2 indices and 1 values"):
        decode(unpaired, (4,), torch.float32)
