import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesparse.shards import ShardError
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
    with pytest.raises(ShardError, match="not written by pipesparse") as info:
        read_sparse(shards_dir / "part-00.parquet")
    assert info.value.file == str(shards_dir / "part-00.parquet")


_VEC = {"shape": [8], "dtype": "float"}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", r"\[1, 2\], not a JSON object"),
        (json.dumps({"columns": {"vec": _VEC}}), "no key 'format'"),
        (json.dumps({"format": "coo"}), "no key 'columns'"),
        (json.dumps({"format": "csr", "columns": {"vec": _VEC}}), "format is 'csr'"),
        (
            json.dumps({"format": "coo", "columns": ["vec"]}),
            r"'columns' is \['vec'\], expected an object",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": 3}}),
            r"columns\['vec'\] is 3, expected an object",
        ),
        (json.dumps({"format": "coo", "columns": {"vec": {"dtype": "float"}}}), "no key 'shape'"),
        (json.dumps({"format": "coo", "columns": {"vec": {"shape": [8]}}}), "no key 'dtype'"),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": "8", "dtype": "float"}}}),
            r"\['shape'\] is '8', expected a non-empty list of non-negative ints",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [-8], "dtype": "float"}}}),
            r"\['shape'\] is \[-8\]",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [True], "dtype": "float"}}}),
            r"\['shape'\] is \[True\]",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [8], "dtype": "floaty"}}}),
            r"\['dtype'\] is 'floaty', expected a numeric Arrow type",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [8], "dtype": 3}}}),
            r"\['dtype'\] is 3",
        ),
        (
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [8], "dtype": "string"}}}),
            r"\['dtype'\] is 'string'",
        ),
        (  # the column holds float values: they were cast to uint64 silently
            json.dumps({"format": "coo", "columns": {"vec": {"shape": [8], "dtype": "uint64"}}}),
            r"\['dtype'\] is 'uint64', but column 'vec' holds float values",
        ),
        (
            json.dumps({"format": "coo", "columns": {"zzz": _VEC}}),
            "column 'zzz' it records is not in the file",
        ),
        (
            json.dumps({"format": "coo", "columns": {"label": _VEC}}),
            "column 'label' has type string, not the COO struct",
        ),
    ],
)
def test_read_sparse_names_the_file_and_the_problem_of_broken_metadata(
    tmp_path, shards_dir, raw, problem
):
    """Broken metadata raised a bare JSONDecodeError, KeyError, TypeError or AttributeError."""
    preprocess([str(shards_dir)], tmp_path / "o", "vec", "norm", out_format="coo", quiet=True)
    table = pq.read_table(tmp_path / "o" / "part-00.parquet")
    raw = raw if isinstance(raw, bytes) else raw.encode()
    path = tmp_path / "broken.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: raw}), path)
    with pytest.raises(ShardError, match=problem) as info:
        read_sparse(path)
    assert info.value.file == str(path)
    assert "broken 'pipesparse' schema metadata" in str(info.value)


def test_read_sparse_refuses_a_recorded_dtype_the_dense_column_does_not_hold(tmp_path, shards_dir):
    preprocess([str(shards_dir)], tmp_path / "o", "vec", "norm", quiet=True)
    table = pq.read_table(tmp_path / "o" / "part-00.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["columns"]["vec"]["dtype"] = "int8"
    path = tmp_path / "int8.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), path)
    with pytest.raises(ShardError, match=r"is 'int8', but column 'vec' holds float values"):
        read_sparse(path)


def test_read_sparse_names_the_file_of_a_bad_coo_row(tmp_path, shards_dir):
    preprocess([str(shards_dir)], tmp_path / "o", "vec", "norm", out_format="coo", quiet=True)
    table = pq.read_table(tmp_path / "o" / "part-00.parquet")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["columns"]["vec"]["shape"] = [2]
    path = tmp_path / "short.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)}), path)
    with pytest.raises(
        ShardError, match=r"short.parquet, column 'vec': COO row 0 has index"
    ) as info:
        read_sparse(path)
    assert info.value.column == "vec"


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


@pytest.mark.parametrize("engine", ["local", "hf"])
def test_coo_output_keeps_the_column_nullability_and_field_metadata(tmp_path, engine):
    """The COO column was a fresh nullable field without metadata; dense output keeps both."""
    field = pa.field("e", pa.list_(pa.float32()), nullable=False, metadata={b"unit": b"cm"})
    schema = pa.schema([field, pa.field("id", pa.int64())])
    rows = [[1.0, 0.5, 2.0, 0.1], [0.2, 3.0, 0.0, 1.0]]
    table = pa.table([pa.array(rows, field.type), pa.array([0, 1])], schema=schema)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "s.parquet")
    for fmt in ("dense", "coo"):
        out = tmp_path / f"{engine}-{fmt}"
        preprocess(
            [str(tmp_path / "in")], out, "e", "threshold", out_format=fmt, engine=engine, quiet=True
        )
        written = pq.read_schema(out / "s.parquet").field("e")
        assert not written.nullable, fmt
        assert written.metadata == {b"unit": b"cm"}, fmt
    assert written.type == coo_type(pa.float32())
    dense, coo = (
        read_sparse(tmp_path / f"{engine}-{f}" / "s.parquet")["e"] for f in ("dense", "coo")
    )
    assert torch.equal(dense, coo)


def test_read_sparse_names_a_damaged_file(tmp_path, damaged):
    """A file that is not Parquet, or whose pages are damaged, raised pyarrow's error, which
    does not name the file."""
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"e": pa.array([[1.0, 2.0]] * 50, pa.list_(pa.float32()))}),
        tmp_path / "in" / "s.parquet",
    )
    preprocess([str(tmp_path / "in")], tmp_path / "o", "e", "norm", out_format="coo", quiet=True)
    broken = tmp_path / "o" / "s.parquet"
    damaged(broken)  # the first page is column e's
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file")
    for path in (broken, garbage):
        with pytest.raises(ShardError, match="cannot read the file") as info:
            read_sparse(path)
        assert info.value.file == str(path)
    with pytest.raises(FileNotFoundError):
        read_sparse(tmp_path / "missing.parquet")


def test_read_sparse_takes_columns_as_preprocess_does(tmp_path, shards_dir):
    """A column named twice raised pyarrow's KeyError 'Field "vec" exists 2 times in schema',
    and a list item "img,vec" (preprocess splits it) was one unknown column."""
    preprocess([str(shards_dir)], tmp_path / "o", "vec,img", "threshold", quiet=True)
    path = tmp_path / "o" / "part-01.parquet"
    assert list(read_sparse(path, ["img,vec"])) == ["img", "vec"]
    for columns in ("vec,vec", ["vec", "vec"], ["vec", "img,vec"]):
        with pytest.raises(ValueError, match="names a column twice"):
            read_sparse(path, columns)
