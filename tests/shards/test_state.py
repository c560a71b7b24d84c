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


def test_a_one_mask_transform_state_serves_one_column_only():
    transform = SparsifyTransform(DataNormSparsifier(), keys=["a"], update="frozen")
    transform.fit({"a": torch.randn(5, 4), "b": torch.randn(5, 4)})  # one mask: 'batch'
    state = transform.state_dict()
    alone = transform_state_for(state, "s.pt", SPECS[:1])
    assert list(alone["sparsifier"]["state"]) == ["batch"]
    with pytest.raises(CorruptStateError, match="no mask for column 'a'.*'batch_a'"):
        transform_state_for(state, "s.pt", [SPECS[0], ColumnSpec("c", (4,), "f")])


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


@pytest.mark.parametrize("update", ["every_batch", "frozen"])
def test_describe_batch_masks(update):
    transform = SparsifyTransform(DataNormSparsifier(), update=update, mask_over="batch")
    transform(torch.randn(3, 8))
    described = describe_state(transform.state_dict(), "s.pt")
    assert described["header"] == {
        "kind": "transform",
        "name": "batch",
        "update": update,
        "mask_over": "batch",
        "batches_seen": 1,
    }
    entry = described["masks"]["batch"]
    assert entry["shape"] == (3, 8) and entry["kept"] == 12 and entry["sparsity"] == 0.5
    with pytest.raises(CorruptStateError, match="mask_over='batch' masks"):  # --state still refuses
        transform_state_for(transform.state_dict(), "s.pt", [ColumnSpec("batch", (8,), "f")])


def test_a_sparsifier_state_without_a_key_says_which():
    for state in (
        {"format": "pipesparse.data_sparsifier/1", "state": {}},
        {"state": {}},
    ):
        with pytest.raises(CorruptStateError, match="without its 'data_groups' key"):
            describe_state(state, "s.pt")
    with pytest.raises(CorruptStateError, match="has no 'format' key; accepted"):
        describe_state({"x": 1}, "s.pt")


def test_a_file_torch_cannot_load_is_one_line(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("print('hi')\n")
    with pytest.raises(CorruptStateError) as caught:
        load_state_file(script)
    message = str(caught.value)
    assert "\n" not in message and "weights_only` set to `False" not in message
    assert message.startswith(f"state file {script} cannot be read as a torch state: it is not")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CorruptStateError, match="empty.pt .*: the file ends early"):
        load_state_file(tmp_path / "empty.pt")


def test_describe():
    described = describe_state(_sparsifier_state(), "s.pt")
    assert described["header"] == {"kind": "sparsifier"}
    entry = described["masks"]["a"]
    assert entry["shape"] == (4,) and entry["kept"] == 2 and entry["sparsity"] == 0.5
    assert entry["config"]["sparse_block_shape"] == (1, 2)


def _fit_state(tmp_path, columns, shards_dir):
    from pipesparse.shards.fit import fit

    return fit([str(shards_dir)], columns, tmp_path / "s.pt", quiet=True)


def test_fit_masks_are_matched_by_the_columns_they_were_fitted_on(tmp_path, shards_dir):
    state = _fit_state(tmp_path, "vec,img", shards_dir)
    vec = ColumnSpec("vec", (8,), "f")
    out = transform_state_for(state, "s.pt", [vec])  # a subset of the fitted columns
    fitted = state["transform"]["sparsifier"]["state"]["batch_vec"]["mask"]
    assert torch.equal(out["sparsifier"]["state"]["batch"]["mask"], fitted)
    one = _fit_state(tmp_path, "vec", shards_dir)  # its mask is named "batch": whose is it?
    with pytest.raises(
        CorruptStateError,
        match=r"fitted on columns \['vec'\]\) has no mask for column 'fixed' \(it has: \['batch'\]",
    ):
        transform_state_for(one, "s.pt", [ColumnSpec("fixed", (8,), "f")])


def test_fit_masks_of_dotted_column_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipesparse.shards.fit import fit, fit_report

    (tmp_path / "in").mkdir()
    rows = pa.array([[1.0, 2.0, 3.0, 4.0]] * 3, pa.list_(pa.float32()))
    pq.write_table(pa.table({"a.b": rows, "c": rows}), tmp_path / "in" / "x.parquet")
    state = fit([str(tmp_path / "in")], "a.b,c", tmp_path / "s.pt", quiet=True)
    assert "fitted a.b (4,)" in fit_report(state, tmp_path / "s.pt")
    specs = [ColumnSpec("a.b", (4,), "f"), ColumnSpec("c", (4,), "f")]
    assert set(transform_state_for(state, "s.pt", specs)["sparsifier"]["state"]) == {
        "batch_a_b",
        "batch_c",
    }
    assert describe_state(state, "s.pt")["masks"]["batch_a_b"]["column"] == "a.b"


def _with(state, path, value):
    """A copy of ``state`` with the entry at ``path`` (keys) replaced by ``value``."""
    import copy

    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("state",), 5, "s.pt: state is int 5, expected a dict"),
        (("data_groups", "a"), 5, r"s.pt: data_groups\['a'\] is int 5, expected a dict"),
        (("state", "a"), [1], r"s.pt: state\['a'\] is list \[1\], expected a dict"),
        (("mask_dtypes",), "x", "s.pt: mask_dtypes is str 'x', expected a dict"),
    ],
)
def test_corrupt_sparsifier_states_name_the_key(path, value, message):
    state = _with(_sparsifier_state(), path, value)
    for call in (
        lambda: transform_state_for(state, "s.pt", SPECS),
        lambda: describe_state(state, "s.pt"),
    ):
        with pytest.raises(CorruptStateError, match=message):
            call()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("transform", "config"), "x", "transform.config is str 'x', expected a dict"),
        (("transform", "sparsifier"), 5, "transform.sparsifier is int 5, expected a dict"),
        (("transform", "sparsifier", "state"), 5, "transform.sparsifier.state is int 5"),
        (("transform",), 5, "transform is int 5, expected a dict"),
        (("sparsifier",), ["norm"], r"sparsifier is list \['norm'\], expected a string"),
        (("columns",), 5, "columns is int 5, expected a dict"),
        (("columns", "vec"), "x", r"columns\['vec'\] is str 'x', expected a list of ints"),
    ],
)
def test_corrupt_fit_files_name_the_key(tmp_path, shards_dir, path, value, message):
    state = _with(_fit_state(tmp_path, "vec", shards_dir), path, value)
    for call in (
        lambda: transform_state_for(state, "s.pt", [ColumnSpec("vec", (8,), "f")]),
        lambda: describe_state(state, "s.pt"),
    ):
        with pytest.raises(CorruptStateError, match=f"state file s.pt: {message}"):
            call()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("transform", "sparsifier", "data_groups", "batch", "sparsity_level"),
            "x",
            "config for 'batch' is invalid: sparsity_level must be a number",
        ),
        (
            ("transform", "sparsifier", "mask_dtypes", "batch"),
            "weird",
            "'batch' the unknown mask dtype 'weird'",
        ),
        (
            ("transform", "sparsifier", "state", "batch", "mask"),
            torch.ones(1, 8, dtype=torch.complex64),
            "mask for 'batch' has dtype torch.complex64",
        ),
    ],
)
def test_a_state_the_transform_refuses_names_the_file(tmp_path, shards_dir, path, value, message):
    """Values of the right type that the transform's load_state_dict refuses were reported as
    'state_dict config ...', without the file."""
    from pipesparse.shards import preprocess

    state = _with(_fit_state(tmp_path, "vec", shards_dir), path, value)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CorruptStateError, match=f"^state file {tmp_path / 'bad.pt'}: .*{message}"):
        preprocess(
            [str(shards_dir)], tmp_path / "out", "vec", state=str(tmp_path / "bad.pt"), quiet=True
        )
    assert not (tmp_path / "out").exists()


def test_a_rule_that_does_not_fit_names_the_mask_of_the_file(tmp_path):
    """A sparsifier state names its masks after the columns; the error named the mask as
    preprocessing renames it ('batch'), which the file does not have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipesparse.shards import preprocess

    rows = pa.array([[1.0, 5.0, 3.0, 7.0]] * 2, pa.list_(pa.float32()))
    pq.write_table(pa.table({"a": rows}), tmp_path / "a.parquet")
    torch.save(_sparsifier_state(), tmp_path / "s.pt")  # norm masks 'a' (4,) and 'b' (2, 2)
    with pytest.raises(
        ValueError, match=r"the config of mask 'a' \(column 'a'\) in .*s\.pt does not fit"
    ):
        preprocess(
            [str(tmp_path / "a.parquet")],
            tmp_path / "out",
            "a",
            "threshold",
            state=str(tmp_path / "s.pt"),
            quiet=True,
        )


def test_a_fit_file_with_an_unknown_rule_names_the_file(tmp_path, shards_dir):
    """The error was 'unknown sparsifier 'bogus'', a name the user never typed."""
    state = _with(_fit_state(tmp_path, "vec", shards_dir), ("sparsifier",), "bogus")
    message = r"state file s.pt: sparsifier is 'bogus', expected one of norm, threshold, nm"
    for call in (
        lambda: transform_state_for(state, "s.pt", [ColumnSpec("vec", (8,), "f")]),
        lambda: describe_state(state, "s.pt"),
    ):
        with pytest.raises(CorruptStateError, match=message):
            call()


def test_a_mask_without_a_config_says_so():
    """The missing config was reported as a config that does not fit the rule ('threshold
    must be a number, got None'), whatever --sparsifier was passed."""
    state = _sparsifier_state()
    del state["data_groups"]["a"]
    with pytest.raises(
        CorruptStateError,
        match=r"s.pt: mask 'a' has no config in data_groups \(it has configs for: \['b'\]\)",
    ):
        transform_state_for(state, "s.pt", SPECS[:1])


def test_a_meta_tensor_mask_is_refused_naming_the_file():
    """A mask on the meta device (no data) made inspect crash with a traceback, and preprocess
    fail in the engine, blaming the input shard."""
    state = _with(_sparsifier_state(), ("state", "a", "mask"), torch.empty(4, device="meta"))
    for call in (
        lambda: transform_state_for(state, "s.pt", SPECS[:1]),
        lambda: describe_state(state, "s.pt"),
    ):
        with pytest.raises(CorruptStateError, match="s.pt: mask 'a' is a meta tensor"):
            call()
