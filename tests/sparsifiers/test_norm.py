"""DataNormSparsifier: every option, N-D semantics, and a differential test against torch.ao."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesparse import DataNormSparsifier
from pipesparse.sparsifiers.norm import norm_keep_mask


def _mask(x: torch.Tensor, **config) -> torch.Tensor:
    norm = config.pop("norm", "L1")
    s = DataNormSparsifier(norm=norm)
    s.add_data("x", x, **config)
    s.step()
    return s.get_mask("x")


def test_defaults():
    s = DataNormSparsifier()
    assert s.defaults == {
        "sparsity_level": 0.5,
        "sparse_block_shape": (1, 4),
        "zeros_per_block": None,
    }
    assert s.norm == "L1"


def test_lowest_norm_blocks_are_zeroed():
    x = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1],
            [2.0, 2.0, 2.0, 2.0, -0.2, 0.2, 0.2, 0.2],
        ]
    )
    expected = torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] * 4 + [0.0] * 4])
    assert torch.equal(_mask(x, sparsity_level=0.5), expected)
    assert torch.equal(
        _mask(x, sparsity_level=0.25), torch.tensor([[1.0] * 4 + [0.0] * 4] + [[1.0] * 8])
    )


def test_mask_has_the_datas_dtype_and_shape_and_the_pure_function_gives_bool():
    x = torch.randn(3, 8, dtype=torch.float64)
    mask = _mask(x)
    assert mask.dtype == torch.float64 and mask.shape == x.shape
    keep = norm_keep_mask(x, 0.5, (1, 4), None, "L1")
    assert keep.dtype == torch.bool and torch.equal(keep, mask.bool())


@pytest.mark.parametrize("level", [0.0, -0.5, -3.0, -math.inf])
def test_sparsity_at_or_below_zero_keeps_everything(level):
    assert torch.equal(_mask(torch.randn(4, 8), sparsity_level=level), torch.ones(4, 8))


def test_negative_sparsity_does_not_repeat_the_reference_bug(torch_ao_mask):
    """torch.ao slices its sorted block list with a negative index: -0.5 removes half the blocks."""
    x = torch.randn(4, 8)
    ref = torch_ao_mask(x, sparsity_level=-0.5, sparse_block_shape=(1, 1))
    assert int((ref == 0).sum()) == 16  # the reference's bug
    assert torch.equal(_mask(x, sparsity_level=-0.5, sparse_block_shape=(1, 1)), torch.ones(4, 8))


@pytest.mark.parametrize("level", [1.0, 1.5, math.inf])
@pytest.mark.parametrize("block", [(1, 4), (3, 3), (2, 5)])
def test_sparsity_at_or_above_one_with_whole_blocks_zeroes_everything(level, block):
    assert not _mask(torch.randn(5, 7), sparsity_level=level, sparse_block_shape=block).any()


def test_sparsity_one_with_partial_blocks_zeroes_zeros_per_block_in_each():
    x = torch.randn(4, 8)
    mask = _mask(x, sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=1)
    assert torch.equal((mask == 0).reshape(8, 4).sum(dim=1), torch.ones(8, dtype=torch.long))
    # the zero in every block is at the entry with the smallest |x|
    assert torch.equal(
        (mask == 0).reshape(8, 4).float().argmax(dim=1), x.abs().reshape(8, 4).argmin(dim=1)
    )


def test_zeros_per_block_zeroes_the_smallest_entries_of_removed_blocks_only():
    x = torch.tensor([[4.0, -1.0, 3.0, 2.0, 0.5, -0.4, 0.1, 0.3]])
    mask = _mask(x, sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    # block 2 has the lower norm; inside it, 0.1 and 0.3 are the smallest magnitudes
    assert mask.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


def test_zeros_per_block_zero_keeps_everything():
    assert torch.equal(
        _mask(torch.randn(4, 8), sparsity_level=0.9, zeros_per_block=0), torch.ones(4, 8)
    )


def test_l1_and_l2_rank_blocks_differently():
    # block A: mean|x| = 1.0, mean x^2 = 1.0; block B: mean|x| = 0.875, mean x^2 = 3.0625
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.5]])
    assert _mask(x, norm="L1").tolist() == [[1.0] * 4 + [0.0] * 4]
    assert _mask(x, norm="L2").tolist() == [[0.0] * 4 + [1.0] * 4]


def test_edge_blocks_are_ranked_by_the_mean_of_the_entries_they_have():
    # width 6, blocks of 4: the edge block holds [2.0, 0.5] (mean 1.25, sum 2.5); the full
    # block holds four 1.1s (mean 1.1, sum 4.4). Means rank the full block lower.
    x = torch.tensor([[1.1, 1.1, 1.1, 1.1, 2.0, 0.5]])
    assert _mask(x, sparsity_level=0.5).tolist() == [[0.0] * 4 + [1.0] * 2]
    # the same along the height
    y = torch.tensor([[1.1], [1.1], [1.1], [2.0]])
    assert _mask(y, sparsity_level=0.5, sparse_block_shape=(3, 1)).tolist() == [[0.0]] * 3 + [[1.0]]


def test_zeros_per_block_in_an_edge_block_zeroes_the_entries_it_has():
    x = torch.tensor([[5.0, 5.0, 5.0, 5.0, 0.1, 0.2]])
    mask = _mask(x, sparsity_level=0.5, zeros_per_block=3)
    assert mask.tolist() == [[1.0] * 4 + [0.0, 0.0]]


def test_ties_go_to_the_lower_block_index():
    mask = _mask(torch.ones(2, 8), sparsity_level=0.5)
    assert mask.tolist() == [[0.0] * 8, [1.0] * 8]


def test_per_name_config_overrides_defaults():
    s = DataNormSparsifier(sparsity_level=0.5)
    s.add_data("a", torch.randn(4, 8))
    s.add_data("b", torch.randn(4, 8), sparsity_level=0.25, sparse_block_shape=(2, 2))
    s.step()
    assert int((s.get_mask("a") == 0).sum()) == 16
    assert int((s.get_mask("b") == 0).sum()) == 8


def test_per_name_norm_is_used_and_checked():
    # README: per-name config in add_data, and a norm other than "L1"/"L2" is a ValueError
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.5]])
    s = DataNormSparsifier(norm="L1")
    s.add_data("l2", x.clone(), norm="L2")
    s.add_data("l1", x.clone())
    s.step()
    assert s.get_mask("l2").tolist() == [[0.0] * 4 + [1.0] * 4]
    assert s.get_mask("l1").tolist() == [[1.0] * 4 + [0.0] * 4]
    restored = DataNormSparsifier()
    restored.load_state_dict(s.state_dict())
    restored.step()
    assert restored.get_mask("l2").tolist() == [[0.0] * 4 + [1.0] * 4]
    with pytest.raises(ValueError, match="L3"):
        s.add_data("bad", x.clone(), norm="L3")
    assert "bad" not in s.data_groups


def test_integer_data_is_ranked_by_its_values():
    x = torch.tensor([[9, 9, 9, 9, 1, -1, 1, 1]], dtype=torch.int64)
    s = DataNormSparsifier([("x", x)])
    s.step()
    assert s.get_data("x", return_original=False).tolist() == [[9, 9, 9, 9, 0, 0, 0, 0]]


def test_numpy_scalars_in_the_config_are_accepted_and_saved_as_python_numbers(tmp_path):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    s = DataNormSparsifier(
        sparsity_level=np.float32(0.5),
        sparse_block_shape=(np.int64(2), np.int32(2)),
        zeros_per_block=np.int64(3),
    )
    s.add_data("x", x, sparsity_level=np.float64(0.25))
    s.step()
    assert torch.equal(
        s.get_mask("x"),
        _mask(x, sparsity_level=0.25, sparse_block_shape=(2, 2), zeros_per_block=3),
    )
    torch.save(s.state_dict(), tmp_path / "state.pt")
    groups = torch.load(tmp_path / "state.pt", weights_only=True)["data_groups"]
    assert groups["x"] == {
        "sparsity_level": 0.25,
        "sparse_block_shape": (2, 2),
        "zeros_per_block": 3,
    }
    assert type(s.defaults["sparsity_level"]) is float
    assert [type(d) for d in s.defaults["sparse_block_shape"]] == [int, int]
    s.data_groups["x"]["sparsity_level"] = np.float32(0.5)  # as a scheduler may write it
    torch.save(s.state_dict(), tmp_path / "state.pt")
    groups = torch.load(tmp_path / "state.pt", weights_only=True)["data_groups"]
    assert groups["x"]["sparsity_level"] == 0.5


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint32, torch.uint64])
@pytest.mark.parametrize("rule", ["L1", "L2"])
def test_wide_integers_above_2_to_the_24_keep_their_order(dtype, rule):
    # float32 would round 2**24 + 1 to 2**24: a tie, and the lower index would be dropped
    x = torch.tensor([[2**24 + 1, 2**24]], dtype=dtype)
    config = dict(sparsity_level=0.5, sparse_block_shape=(1, 1), norm=rule)
    assert _mask(x, **config).tolist() == [[1, 0]]  # the compiled kernel on CPU
    assert norm_keep_mask(x, 0.5, (1, 1), None, rule).tolist() == [[True, False]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ranks_like_float32(dtype):
    x = torch.randn(6, 16).to(dtype)
    mask = _mask(x, sparsity_level=0.5, sparse_block_shape=(2, 2))
    assert mask.dtype == dtype
    assert torch.equal(
        mask.float(), _mask(x.float(), sparsity_level=0.5, sparse_block_shape=(2, 2))
    )


# -- N-D ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zeros", [None, 1])
def test_leading_dims_are_a_batch_of_matrices(zeros, torch_ao_mask):
    x = torch.randn(2, 3, 5, 7)
    config = dict(sparsity_level=0.4, sparse_block_shape=(2, 3), zeros_per_block=zeros)
    mask = _mask(x, **config)
    for i in range(2):
        for j in range(3):
            assert torch.equal(mask[i, j], _mask(x[i, j], **config))
            assert torch.equal(mask[i, j].bool(), torch_ao_mask(x[i, j], **config).bool())


def test_one_d_data_is_one_row_and_zero_d_one_element():
    x = torch.randn(12)
    assert torch.equal(_mask(x), _mask(x[None, :])[0])
    assert _mask(torch.tensor(3.0), sparsity_level=1.0).item() == 0.0
    assert _mask(torch.tensor(3.0), sparsity_level=0.4).item() == 1.0  # round(0.4 * 1) = 0 blocks


def test_empty_data_gets_an_empty_mask():
    assert _mask(torch.randn(0, 4)).shape == (0, 4)


def test_a_column_is_handled_as_a_column(torch_ao_mask):
    """(n, 1) is an n x 1 matrix: its blocks run down the column. torch.ao squeezes it to a
    row and stores a mask of the wrong shape (1, n)."""
    x = torch.randn(10, 1)
    mask = _mask(x, sparsity_level=0.5, sparse_block_shape=(2, 1))
    assert mask.shape == (10, 1)
    assert torch.equal(mask, _mask(x.T, sparsity_level=0.5, sparse_block_shape=(1, 2)).T)
    # equal to the reference on the transposed problem, where it works
    ref_t = torch_ao_mask(x.T.contiguous(), sparsity_level=0.5, sparse_block_shape=(1, 2))
    assert torch.equal(mask.bool(), ref_t.T.bool())
    assert torch_ao_mask(x, sparsity_level=0.5, sparse_block_shape=(2, 1)).shape == (1, 10)


# -- differential test against torch.ao ----------------------------------------------------------
@settings(max_examples=300)
@given(
    height=st.integers(1, 40),
    width=st.integers(2, 40),
    block=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    zeros_fraction=st.one_of(st.none(), st.floats(0, 1)),
    sparsity=st.floats(0, 1),
    norm=st.sampled_from(["L1", "L2"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_masks_equal_the_reference(
    height, width, block, zeros_fraction, sparsity, norm, seed, torch_ao_mask
):
    x = torch.randn(height, width, generator=torch.Generator().manual_seed(seed))  # tie-free
    zeros = None if zeros_fraction is None else round(zeros_fraction * block[0] * block[1])
    config = dict(sparsity_level=sparsity, sparse_block_shape=block, zeros_per_block=zeros)
    ours = _mask(x, norm=norm, **config)
    if zeros is None:
        config["zeros_per_block"] = block[0] * block[1]
    assert torch.equal(ours.bool(), torch_ao_mask(x, norm=norm, **config).bool())
