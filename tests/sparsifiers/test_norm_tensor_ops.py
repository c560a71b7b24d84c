"""The tensor-op path of DataNormSparsifier (CUDA's, and the oracle of the CPU kernel):
sampled selection, tie breaking and avg_pool2d-identical block means. Small tensors except
where a path needs >= 32768 blocks."""

import math

import pytest
import torch
from torch.nn import functional as F

from pipesparse.sparsifiers import norm
from pipesparse.sparsifiers.norm import DataNormSparsifier, norm_keep_mask


@pytest.mark.parametrize("rule", ["L1", "L2"])
@pytest.mark.parametrize("level", [0.5, 0.03, 0.97])
def test_sampled_selection_matches_reference_on_a_large_matrix(rule, level, torch_ao_mask):
    # 256 x 512 with 1x4 blocks: 32768 blocks, the sampled-bracket selection path
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    got = norm_keep_mask(x, level, (1, 4), None, rule)
    assert torch.equal(
        got,
        torch_ao_mask(
            x, rule, sparsity_level=level, sparse_block_shape=(1, 4), zeros_per_block=4
        ).bool(),
    )


def _sorted_smallest(values, k):
    """The k smallest of each row by a stable sort (NaN as +inf): the slow, obvious oracle."""
    order = values.nan_to_num(math.inf, math.inf, -math.inf).sort(dim=1, stable=True).indices
    chosen = torch.zeros_like(values, dtype=torch.bool)
    return chosen.scatter_(1, order[:, :k], True)


@pytest.mark.parametrize("rows,length", [(1, 40000), (1, 70000), (3, 50)])
@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_smallest_breaks_ties_by_index_on_long_rows(rows, length, levels):
    generator = torch.Generator().manual_seed(levels)
    values = torch.randint(0, levels, (rows, length), generator=generator).float()
    values.view(-1)[:: max(1, values.numel() // 30)] = math.nan
    for k in (1, length // 3, length // 2, length):
        assert torch.equal(norm._smallest(values.clone(), k), _sorted_smallest(values, k))


def _sorted_keep_mask(x, level, block_w):
    """Keep mask of 1 x ``block_w`` blocks by a stable sort of the block means (NaN as +inf)."""
    means = F.avg_pool2d(x.abs()[None], (1, block_w), (1, block_w)).view(1, -1)
    dropped = _sorted_smallest(means, round(level * means.numel())).view(x.shape[0], -1, 1)
    return dropped.logical_not().expand(-1, -1, block_w).reshape(x.shape)


@pytest.mark.parametrize("level", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("shift", [-0.05, -0.01, -0.001, 0.0, 0.001, 0.01, 0.05])
def test_sampled_selection_is_exact_when_a_share_of_the_norms_is_nan(level, shift):
    # NaN ranks as +inf: a share of NaN norms near 1 - level puts the sample's upper (or both)
    # bracket bounds on NaN. 256 x 512 with 1x4 blocks: 32768 blocks, the sampled path
    generator = torch.Generator().manual_seed(round(1000 * (level + shift)))
    x = torch.randn(256, 512, generator=generator)
    blocks = x.view(-1, 4)
    share = 1 - level + shift
    nan_blocks = torch.randperm(blocks.shape[0], generator=generator)[: round(share * len(blocks))]
    blocks[nan_blocks, 1] = math.nan
    expected = _sorted_keep_mask(x, level, 4)
    assert torch.equal(norm_keep_mask(x, level, (1, 4), None), expected)
    sparsifier = DataNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
    sparsifier.add_data("x", x)
    sparsifier.step()  # the compiled kernel on CPU
    assert torch.equal(sparsifier.get_mask("x").bool(), expected)


def test_a_sparsifier_with_nan_in_half_the_blocks_drops_the_blocks_a_stable_sort_drops():
    # 5x5 blocks with one zero each: the sparsifier's tensor-op path on CPU. 185 x 185 blocks
    # (>= 32768: sampled selection), the first 90 block rows NaN, half the blocks dropped
    x = torch.randn(925, 925, generator=torch.Generator().manual_seed(0))
    x[:450] = math.nan
    sparsifier = DataNormSparsifier(
        sparsity_level=0.5, sparse_block_shape=(5, 5), zeros_per_block=1
    )
    sparsifier.add_data("x", x)
    sparsifier.step()
    touched = (sparsifier.get_mask("x") == 0).view(185, 5, 185, 5).any(3).any(1)
    means = F.avg_pool2d(x.abs()[None], 5, 5).view(1, -1)
    assert torch.equal(touched.view(1, -1), _sorted_smallest(means, round(0.5 * means.numel())))


@pytest.mark.parametrize("block", [(1, 2), (1, 4), (2, 2), (4, 4), (1, 8), (2, 4)])
def test_block_means_are_bit_identical_to_avg_pool2d(block):
    values = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1)).abs()
    values[0] *= 1e-40  # subnormal means: division must round exactly like avg_pool2d's
    pooled = F.avg_pool2d(values[:, None], block, block, ceil_mode=True)[:, 0]
    assert torch.equal(norm._block_means(values, block), pooled)


def test_masks_stay_right_when_the_shape_changes_between_batches():
    # scratch buffers are reused per shape: a stream of mixed shapes must not mix them up
    sparsifier = DataNormSparsifier(sparsity_level=0.5)
    generator = torch.Generator().manual_seed(0)
    for shape in [(8, 16), (4, 32), (8, 16), (2, 3, 8), (8, 16)]:
        x = torch.randn(shape, generator=generator)
        sparsifier.add_data("x", x, reuse_mask=False)
        sparsifier.step()
        assert torch.equal(sparsifier.get_mask("x").bool(), norm_keep_mask(x, 0.5, (1, 4), None))


def test_norm_keep_mask_accepts_data_that_requires_grad():
    x = torch.randn(4, 8, requires_grad=True)
    assert norm_keep_mask(x, 0.5, (1, 4), None).sum() == 16
