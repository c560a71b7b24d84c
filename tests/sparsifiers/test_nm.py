"""NMSparsifier: n largest |x| kept in every group of m along the last dim."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm

from pipesparse import CorruptStateError, NMSparsifier
from pipesparse.sparsifiers.nm import nm_keep_mask

pytestmark = pytest.mark.filterwarnings("ignore:semi_structured asked")


def _stepped(data: torch.Tensor, **kwargs) -> tuple[NMSparsifier, torch.Tensor]:
    sparsifier = NMSparsifier(**kwargs)
    sparsifier.add_data("x", data)
    sparsifier.step()
    return sparsifier, sparsifier.get_data("x", return_original=False)


def test_two_four_keeps_two_largest_of_each_group():
    data = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.25, 0.125, -0.5, 0.375]])
    sparsifier, masked = _stepped(data)
    assert masked.tolist() == [[0.0, -3.0, 2.0, 0.0, 0.0, 0.0, -0.5, 0.375]]
    assert sparsifier.get_mask("x").tolist() == [[0, 1, 1, 0, 0, 0, 1, 1]]


@given(
    n=st.integers(0, 8),
    extra=st.integers(0, 4),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    groups=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_exactly_n_kept_and_they_are_the_largest(n, extra, lead, groups, seed):
    m = max(n, 1) + extra
    n = min(n, m)
    gen = torch.Generator().manual_seed(seed)
    size = (*lead, groups * m)
    # distinct magnitudes: a random permutation of 1..numel with random signs
    values = torch.randperm(int(torch.tensor(size).prod()), generator=gen).float() + 1
    signs = torch.randint(0, 2, values.shape, generator=gen) * 2 - 1
    data = (values * signs).reshape(size)
    keep = nm_keep_mask(data, n, m)
    assert keep.dtype == torch.bool and keep.shape == data.shape
    grouped_keep = keep.reshape(-1, m)
    grouped_abs = data.abs().reshape(-1, m)
    assert (grouped_keep.sum(dim=1) == n).all()
    if 0 < n < m:
        smallest_kept = torch.where(grouped_keep, grouped_abs, torch.inf).amin(dim=1)
        largest_dropped = torch.where(grouped_keep, -torch.inf, grouped_abs).amax(dim=1)
        assert (smallest_kept > largest_dropped).all()


def test_matches_reference_norm_sparsifier_with_one_by_m_blocks():
    """torch.ao's DataNormSparsifier with (1, m) blocks, every block removed and m - n zeros per
    block is N:M sparsity: the masks must agree on 2-D data."""
    data = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    for n, m in ((2, 4), (1, 4), (3, 8)):
        reference = RefNorm(sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n)
        reference.add_data("x", data.clone())
        reference.step()
        keep = nm_keep_mask(data, n, m)
        assert torch.equal(keep, reference.get_mask("x").bool()), (n, m)


def test_ties_keep_the_lower_index():
    data = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0]])
    assert nm_keep_mask(data, 2, 4).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    assert nm_keep_mask(-data, 2, 4).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]


def test_nan_is_kept_not_hidden():
    data = torch.tensor([[0.5, float("nan"), 2.0, 1.0]])
    assert nm_keep_mask(data, 2, 4).tolist() == [[0, 1, 1, 0]]


@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 8), (2, 1, 2, 4)])
def test_any_rank_is_grouped_along_last_dim(shape):
    data = torch.randn(shape)
    keep = nm_keep_mask(data, 2, 4)
    assert keep.shape == data.shape
    assert (keep.reshape(-1, 4).sum(dim=1) == 2).all()
    flat = nm_keep_mask(data.reshape(-1, 4), 2, 4).reshape(shape)
    assert torch.equal(keep, flat)


def test_n_zero_and_n_equal_m():
    data = torch.randn(2, 8)
    assert not nm_keep_mask(data, 0, 4).any()
    assert nm_keep_mask(data, 4, 4).all()
    assert nm_keep_mask(torch.empty(0, 8), 2, 4).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_dtypes_mask_in_place_and_keep_dtype(dtype):
    data = torch.tensor([[4, -1, 3, 2, 7, 6, -5, 0]]).to(dtype)
    _, masked = _stepped(data)
    assert masked.dtype == dtype
    assert masked.tolist() == torch.tensor([[4, 0, 3, 0, 7, 6, 0, 0]]).to(dtype).tolist()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_the_most_negative_integer_is_the_largest_magnitude(dtype):
    # abs() overflows there (int8: -128 stays -128), which would rank it the smallest
    low = torch.iinfo(dtype).min
    data = torch.tensor([[low, 1, 2, 3], [3, -2, low + 1, 0]], dtype=dtype)
    sparsifier, _ = _stepped(data)
    assert sparsifier.get_mask("x").tolist() == [[1, 0, 0, 1], [1, 0, 1, 0]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_integers_are_their_own_magnitude(dtype):
    data = torch.tensor([[255, 1, 2, 3], [0, 9, 9, 4]], dtype=dtype)
    assert nm_keep_mask(data, 2, 4).tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


@pytest.mark.parametrize(
    ("n", "m"), [(3, 2), (-1, 4), (2, 0), (2.0, 4), (True, 4), (2, "4"), (None, 4)]
)
def test_bad_n_m_is_value_error(n, m):
    with pytest.raises(ValueError, match="N:M sparsity needs|must be an int"):
        NMSparsifier(n=n, m=m)


def test_numpy_integers_are_accepted_for_n_and_m():
    sparsifier, _ = _stepped(torch.randn(2, 8), n=np.int64(1), m=np.int32(4))
    assert (sparsifier.get_mask("x").reshape(-1, 4).sum(dim=1) == 1).all()
    assert [type(v) for v in sparsifier.defaults.values()] == [int, int]


def test_bad_per_name_config_leaves_state_intact(unchanged):
    sparsifier = NMSparsifier()
    sparsifier.add_data("x", torch.randn(2, 8))
    with unchanged(sparsifier), pytest.raises(ValueError, match="n=5, m=4"):
        sparsifier.add_data("x", torch.randn(2, 8), n=5)


def test_last_dim_not_multiple_of_m_is_value_error_naming_shape(unchanged):
    sparsifier = NMSparsifier(n=2, m=4)
    sparsifier.add_data("ok", torch.randn(2, 8))
    with unchanged(sparsifier), pytest.raises(ValueError, match=r"'bad'.*\(3, 6\)"):
        sparsifier.add_data("bad", torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        nm_keep_mask(torch.randn(2, 6), 2, 4)
    # a per-name m that divides the last dim is accepted
    sparsifier.add_data("six", torch.randn(3, 6), n=1, m=3)
    sparsifier.step()
    assert (sparsifier.get_mask("six").reshape(-1, 3).sum(dim=1) == 1).all()


def test_unsupported_data():
    sparsifier = NMSparsifier()
    with pytest.raises(TypeError, match="torch.bool"):
        sparsifier.add_data("b", torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scalar"):
        sparsifier.add_data("s", torch.tensor(1.0))
    assert sparsifier.data_groups == {}


def test_per_batch_path_recomputes_mask_for_each_batch():
    sparsifier = NMSparsifier(n=1, m=2)
    for seed in range(3):
        batch = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
        sparsifier.add_data("batch", batch)
        sparsifier.step()
        expected = batch * nm_keep_mask(batch, 1, 2)
        assert torch.equal(sparsifier.get_data("batch", return_original=False), expected)


def test_embedding_weight_ends_up_two_four_after_squash():
    emb = nn.Embedding(10, 8)
    sparsifier = NMSparsifier([("emb", emb)])
    sparsifier.step()
    sparsifier.squash_mask()
    assert ((emb.weight != 0).reshape(-1, 4).sum(dim=1) <= 2).all()
    assert (emb.weight == 0).float().mean() >= 0.5


def test_state_dict_round_trip_restores_masks_and_config(same):
    sparsifier = NMSparsifier(n=1, m=4)
    sparsifier.add_data("a", torch.randn(3, 8))
    sparsifier.add_data("b", torch.randn(2, 6), n=2, m=3)
    sparsifier.step()
    state = sparsifier.state_dict()
    restored = NMSparsifier()
    restored.load_state_dict(state)
    same(state, restored.state_dict())
    assert restored.data_groups["b"] == {"n": 2, "m": 3}


def _state_with_b(data: torch.Tensor, m: int = 4) -> dict:
    """A stepped 2:4 sparsifier's state with the data and config of 'b' replaced."""
    sparsifier = NMSparsifier(n=2, m=4)
    sparsifier.add_data("a", torch.randn(2, 8))
    sparsifier.add_data("b", torch.randn(2, 8))
    sparsifier.step()
    state = sparsifier.state_dict()
    state["data"]["b"] = data
    state["state"]["b"]["mask"] = torch.ones(data.shape, dtype=torch.bool)
    state["data_groups"]["b"]["m"] = m
    return state


@pytest.mark.parametrize(
    "data,m", [(torch.randn(2, 6), 4), (torch.randn(2, 8), 3)], ids=["last dim 6", "m=3"]
)
def test_loading_data_that_m_does_not_divide_is_corrupt_and_changes_nothing(data, m, unchanged):
    state = _state_with_b(data, m)
    sparsifier = NMSparsifier()
    sparsifier.add_data("a", torch.randn(2, 4))
    with unchanged(sparsifier), pytest.raises(CorruptStateError, match=r"'b'.*multiple of m="):
        sparsifier.load_state_dict(state)


def test_a_load_without_data_keeps_attached_data_only_if_the_loaded_m_divides_it():
    state = _state_with_b(torch.randn(2, 6), m=3)
    del state["data"]
    sparsifier = NMSparsifier(n=1, m=2)
    sparsifier.add_data("b", torch.randn(2, 6))
    sparsifier.load_state_dict(state)
    assert sparsifier.get_data("b").shape == (2, 6)  # m=3 divides 6: kept
    state["data_groups"]["b"]["m"] = 4
    sparsifier.load_state_dict(state)
    with pytest.raises(ValueError, match="no data attached to 'b'"):
        sparsifier.get_data("b")
    sparsifier.step()  # 'b' without data is skipped


def test_a_config_edited_into_one_m_does_not_divide_fails_the_step_before_any_mask_changes(
    unchanged,
):
    sparsifier = NMSparsifier(n=2, m=4)
    sparsifier.add_data("a", torch.randn(2, 8))
    sparsifier.add_data("b", torch.randn(2, 8))
    sparsifier.data_groups["b"]["m"] = 3
    with unchanged(sparsifier), pytest.raises(ValueError, match=r"'b'.*multiple of m=3"):
        sparsifier.step()


def test_semi_structured_needs_two_four():
    with pytest.raises(ValueError, match="2:4"):
        NMSparsifier(n=1, m=4, semi_structured=True)
    sparsifier = NMSparsifier(semi_structured=True)
    with pytest.raises(ValueError, match="'x' is configured 1:4"):
        sparsifier.add_data("x", torch.randn(2, 8), n=1)


def test_semi_structured_refusing_a_per_name_config_registers_nothing(unchanged):
    """The refusal came after the name was registered with its 1:4 config (a failed add_data
    left it there, and a name registered before got the 1:4 config)."""
    sparsifier = NMSparsifier(semi_structured=True)
    sparsifier.add_data("y", torch.randn(2, 8))
    with unchanged(sparsifier):
        with pytest.raises(ValueError, match="'x' is configured 1:4"):
            sparsifier.add_data("x", torch.randn(2, 8), n=1)
        with pytest.raises(ValueError, match="'y' is configured 2:8"):
            sparsifier.add_data("y", torch.randn(2, 8), m=8)
    assert list(sparsifier.data_groups) == ["y"]
    assert sparsifier.data_groups["y"] == {"n": 2, "m": 4}


def test_semi_structured_on_cpu_warns_once_and_returns_dense():
    data = torch.randn(32, 64).half()
    sparsifier = NMSparsifier(semi_structured=True)
    with pytest.warns(UserWarning, match="need CUDA"):
        sparsifier.add_data("x", data)
    sparsifier.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per batch
        masked = sparsifier.get_data("x", return_original=False)
        sparsifier.add_data("x", data)
    assert masked.layout == torch.strided
    assert torch.equal(masked, data * nm_keep_mask(data, 2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparsity needs CUDA")
def test_semi_structured_on_cuda_returns_compressed_tensor():
    from torch.sparse import SparseSemiStructuredTensor

    data = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    sparsifier = NMSparsifier(semi_structured=True)
    sparsifier.add_data("x", data)  # before step(): not 2:4 yet, dense
    sparsifier.step()
    compressed = sparsifier.get_data("x", return_original=False)
    assert isinstance(compressed, SparseSemiStructuredTensor)
    assert torch.equal(compressed.to_dense(), data * nm_keep_mask(data, 2, 4))
