"""DataNormSparsifier: zero the blocks with the lowest L1/L2 norm (torch.ao's rule, any rank).

The last two dims are the matrix that is cut into blocks; leading dims are a batch of
matrices, each masked on its own (1-D data is one row, 0-D one element). Ties are broken
towards the lower block index, so the result is deterministic everywhere.

This runs once per batch, so it is built for speed while keeping the reference's masks bit
for bit. On CPU one compiled kernel (:mod:`._norm_kernel`) does it in two passes over the
batch, the second also writing the masked batch when ``step(masked_out=...)`` asks for it.
Elsewhere (CUDA) plain tensor ops do the same: block means by strided adds in
avg_pool2d's own order, O(n) selection of the k-th block norm (a sampled bracket, then
``kthvalue`` on the few percent inside it; the reference sorts every block), and the kept
blocks written into the mask. :func:`norm_keep_mask` is that tensor-op path, the oracle the
kernel is tested against."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from pipesparse.base import BaseDataSparsifier
from pipesparse.sparsifiers import _norm_kernel
from pipesparse.sparsifiers._scratch import scratch

__all__ = ["DataNormSparsifier"]

_NORMS = ("L1", "L2")
_MAX_SUMMED_BLOCK = 16  # larger blocks: one avg_pool2d beats that many strided adds
_SAMPLED_SELECTION_MIN = 32768  # rows of fewer block norms: plain kthvalue
_SAMPLE_MAX = 16384
_SAMPLES: dict[tuple[int, int, str], torch.Tensor] = {}


def _as_matrices(data: torch.Tensor) -> torch.Tensor:
    """(B, H, W) view: last two dims the matrix, leading dims flattened into B."""
    return data.reshape(-1, *_norm_kernel.matrix_shape(data.shape))


def _elementwise_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """|x| or x*x in :func:`~._norm_kernel.ranked_dtype`, into a scratch buffer."""
    x = x.to(_norm_kernel.ranked_dtype(x.dtype))  # no copy for float32/float64
    out = scratch("norm", x.shape, x.dtype, x.device)
    return torch.abs(x, out=out) if norm == "L1" else torch.mul(x, x, out=out)


def _tiles(height: int, width: int, block: tuple[int, int]) -> bool:
    """Whether the blocks tile the matrix exactly and their mean can be summed term by term in
    the order avg_pool2d uses, divided by a power of two (exact, so the norms are bit-identical)."""
    per_block = block[0] * block[1]
    return (
        height % block[0] == 0
        and width % block[1] == 0
        and per_block <= _MAX_SUMMED_BLOCK
        and per_block & (per_block - 1) == 0
    )


def _block_sums(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(B, rows, cols) sum of each block where the blocks tile the matrix (:func:`_tiles`).

    avg_pool2d adds a window's entries one by one (row by row), then divides by the entry count.
    The same additions are done here with one strided add per position in the block (vectorised
    over all blocks, no pooling kernel), which is several times faster."""
    batch, height, width = values.shape
    block_h, block_w = block
    if block_h * block_w == 1:
        return values
    grid = values.view(batch, height // block_h, block_h, width // block_w, block_w)
    parts = [grid[:, :, i, :, j] for i in range(block_h) for j in range(block_w)]
    total = torch.add(
        parts[0],
        parts[1],
        out=scratch("block_sums", parts[0].shape, parts[0].dtype, parts[0].device),
    )
    for part in parts[2:]:
        total += part
    return total


def _block_means(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(B, rows, cols) mean of each block, bit-identical to ``avg_pool2d(ceil_mode=True)``."""
    if not _tiles(values.shape[1], values.shape[2], block):
        return F.avg_pool2d(values[:, None], block, block, ceil_mode=True)[:, 0]
    per_block = block[0] * block[1]
    sums = _block_sums(values, block)
    return sums if per_block == 1 else sums.div_(per_block)


def _sample_index(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random positions among ``n`` (cached): a sample that no column layout
    can bias, drawn without touching the global RNG."""
    key = (n, size, str(device))
    index = _SAMPLES.get(key)
    if index is None:
        generator = torch.Generator().manual_seed(n)
        index = torch.randint(n, (size,), generator=generator).to(device)
        if len(_SAMPLES) >= 64:
            _SAMPLES.clear()
        _SAMPLES[key] = index
    return index


def _nan_last(values: torch.Tensor) -> torch.Tensor:
    """``values`` with NaN as +inf: the rank this library gives NaN (it sorts last)."""
    return values.nan_to_num(math.inf, math.inf, -math.inf)


def _kth_by_sample(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """The exact ``k``-th smallest of a (N,) tensor and how many values are <= it, or None when
    the sample's bracket missed.

    Two order statistics of a sample bracket the k-th value; counting checks the bracket and
    only the values inside it (a few percent) go through ``kthvalue``. Exact whatever the
    sample holds (NaN included): a bracket that fails the count falls back to full selection.
    The comparisons write 0/1 in the values' float dtype and are counted with ``sum``: on CPU
    that is several times faster than bool outputs and ``count_nonzero``."""
    n = values.numel()
    size = min(_SAMPLE_MAX, round(n ** (2 / 3)))  # balances sample and bracket selection
    sample = values[_sample_index(n, size, values.device)]
    centre = k * size / n
    spread = 2.0 * math.sqrt(size)  # 4 sigma of a sample quantile's rank
    lo_rank, hi_rank = math.floor(centre - spread), math.ceil(centre + spread)
    # a NaN bound is +inf, as NaN ranks: compared as NaN it selects nothing, and `upto - under`
    # would then mark the values below the bracket (-1) as inside it
    lo = _nan_last(sample.kthvalue(lo_rank).values) if lo_rank >= 1 else -math.inf
    hi = _nan_last(sample.kthvalue(hi_rank).values) if hi_rank <= size else math.inf
    under = torch.lt(values, lo, out=scratch("under", values.shape, values.dtype, values.device))
    upto = torch.le(values, hi, out=scratch("upto", values.shape, values.dtype, values.device))
    # NaN is in neither: it ranks above the bracket. Float sums of 0/1 are exact below 2**24.
    below = int(under.sum() if n < 2**24 else under.sum(dtype=torch.float64))
    inside = values[upto.sub_(under).bool()]
    need = k - below  # rank of the k-th value among the values inside the bracket
    if not 1 <= need <= inside.numel():
        return None
    threshold = inside.kthvalue(need).values
    # an infinite k-th value ties with NaN, which the bracket left out: full selection then
    if not math.isfinite(threshold):
        return None
    return threshold, below + int(torch.le(inside, threshold).sum())


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, N): exactly the ``k`` smallest of each row; ties go to the lower index.

    NaN ranks as +inf (ties with it). O(N) selection, no sort: a sampled bracket for one long
    row, ``kthvalue`` along the rows otherwise."""
    found = None
    if values.shape[0] == 1 and values.shape[1] >= _SAMPLED_SELECTION_MIN:
        found = _kth_by_sample(values[0], k)
    if found is None:
        values = _nan_last(values)
        threshold = values.kthvalue(k, dim=1, keepdim=True).values
    else:
        threshold = found[0]
    chosen = torch.le(
        values, threshold, out=scratch("chosen", values.shape, torch.bool, values.device)
    )
    if (found[1] if found else int(chosen.count_nonzero())) == k * values.shape[0]:
        return chosen
    # ties at the threshold (a few entries): keep the lowest-index ones that still fit
    below = values < threshold
    rows, cols = (values == threshold).nonzero(as_tuple=True)
    room = k - (below.count_nonzero().view(1) if values.shape[0] == 1 else below.sum(dim=1))
    first = torch.searchsorted(rows, torch.arange(values.shape[0], device=rows.device))
    rank = torch.arange(rows.numel(), device=rows.device) - first[rows]
    fits = rank < room[rows]
    below[rows[fits], cols[fits]] = True
    return below


def _lowest_in_block(blocks: torch.Tensor, zeros: int) -> torch.Tensor:
    """Bool (..., V): the ``zeros`` smallest entries of each block (NaN padding sorts last)."""
    order = torch.sort(blocks, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(blocks.shape[-1], device=blocks.device).expand_as(order)
    )
    return rank < zeros


def _blocks_to_drop(
    data: torch.Tensor, sparsity_level: float, block: tuple[int, int], zeros_per_block: int | None
) -> tuple[int, int]:
    """(blocks to drop per matrix, entries to zero in each): (0, _) when nothing is dropped."""
    per_block = block[0] * block[1]
    zeros = per_block if zeros_per_block is None else zeros_per_block
    if data.numel() == 0 or sparsity_level <= 0 or zeros == 0:
        return 0, zeros
    height, width = (1, 1, *data.shape)[-2:]  # 0-D: one element, 1-D: one row
    num_blocks = -(-height // block[0]) * -(-width // block[1])
    # level >= 1 (also inf, which round() rejects) removes every block
    return (num_blocks if sparsity_level >= 1 else round(sparsity_level * num_blocks)), zeros


@torch.no_grad()  # scratch buffers are written with out=, which autograd refuses
def _plan(
    data: torch.Tensor, k: int, block: tuple[int, int], norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tensor-op path drops: (removed blocks (B, rows, cols) bool, norms (B, H, W))."""
    values = _elementwise_norm(_as_matrices(data), norm)
    block_norms = _block_means(values, block)
    batch, rows, cols = block_norms.shape
    removed = _smallest(block_norms.reshape(batch, rows * cols), k).view(batch, rows, cols)
    return removed, values


def _drop_mask(
    removed: torch.Tensor, values: torch.Tensor, zeros: int, block: tuple[int, int]
) -> torch.Tensor:
    """Bool (B, H, W): True where an entry is zeroed."""
    batch, height, width = values.shape
    rows, cols = removed.shape[1:]
    block_h, block_w = block
    removed = removed.view(batch, rows, 1, cols, 1)
    if zeros == block_h * block_w:
        drop = removed.expand(batch, rows, block_h, cols, block_w)
    else:  # within removed blocks, drop only the `zeros` smallest entries
        padded = F.pad(
            values, (0, cols * block_w - width, 0, rows * block_h - height), value=math.nan
        )
        blocks = padded.view(batch, rows, block_h, cols, block_w).transpose(2, 3)
        lowest = _lowest_in_block(blocks.reshape(batch, rows, cols, block_h * block_w), zeros)
        lowest = lowest.view(batch, rows, cols, block_h, block_w).transpose(2, 3)
        drop = removed & lowest
    return drop.reshape(batch, rows * block_h, cols * block_w)[:, :height, :width]


def norm_keep_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int],
    zeros_per_block: int | None,
    norm: str = "L1",
) -> torch.Tensor:
    """Bool mask of ``data``'s shape, True where the value is kept, by the tensor-op path (any
    device and dtype; the compiled kernel must agree with it bit for bit)."""
    block = tuple(sparse_block_shape)
    k, zeros = _blocks_to_drop(data, sparsity_level, block, zeros_per_block)
    if k == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    removed, values = _plan(data, k, block, norm)
    return _drop_mask(removed, values, zeros, block).logical_not().reshape(data.shape)


class DataNormSparsifier(BaseDataSparsifier):
    """Zero the ``sparsity_level`` fraction of blocks with the lowest mean L1 (or L2) norm.

    Args:
        data_list: ``(name, data)`` pairs to register.
        sparsity_level: fraction of blocks to zero (rounded half-to-even, as the reference);
            ``<= 0`` keeps everything, ``>= 1`` removes every block.
        sparse_block_shape: ``(height, width)`` of a block, anchored at index 0; edge blocks
            are partial and their norm is the mean of the entries they have.
        zeros_per_block: entries zeroed inside a removed block (its smallest ones); ``None``
            means the whole block, whatever its shape.
        norm: ``"L1"`` (mean |x|) or ``"L2"`` (mean x**2); ``add_data(name, data, norm=...)``
            gives one name its own.
    """

    config_keys = frozenset({"sparsity_level", "sparse_block_shape", "zeros_per_block", "norm"})

    def __init__(
        self,
        data_list: list[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
    ):
        self.norm = norm  # checked with the defaults, by _validate_config
        super().__init__(
            data_list,
            sparsity_level=sparsity_level,
            # a list as the tuple the reference stores; a non-sequence fails validation
            sparse_block_shape=tuple(sparse_block_shape)
            if isinstance(sparse_block_shape, list)
            else sparse_block_shape,
            zeros_per_block=zeros_per_block,
        )

    def _validate_config(self, config: Mapping[str, Any]) -> None:
        norm = config.get("norm", self.norm)
        if not isinstance(norm, str) or norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; accepted: {', '.join(_NORMS)}")
        level = config.get("sparsity_level")
        if isinstance(level, bool) or not isinstance(level, numbers.Real) or math.isnan(level):
            raise ValueError(f"sparsity_level must be a number, got {level!r}")
        shape = config.get("sparse_block_shape")
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) != 2
            or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape
            )
        ):
            raise ValueError(
                f"sparse_block_shape must be two positive ints (height, width), got {shape!r}"
            )
        zeros = config.get("zeros_per_block")
        if zeros is not None:
            if isinstance(zeros, bool) or not isinstance(zeros, numbers.Integral):
                raise ValueError(f"zeros_per_block must be an int or None, got {zeros!r}")
            if not 0 <= zeros <= shape[0] * shape[1]:
                raise ValueError(
                    f"zeros_per_block={zeros} is outside 0..{shape[0] * shape[1]} (the entries of a "
                    f"{shape[0]}x{shape[1]} block)"
                )

    def _validate_data(self, name: str, data: torch.Tensor, config: Mapping[str, Any]) -> None:
        if data.dtype == torch.bool or data.is_complex():
            raise TypeError(
                f"DataNormSparsifier needs real numbers to rank norms; {name!r} has dtype {data.dtype}"
            )

    def update_mask(  # type: ignore[override]
        self,
        name: str,
        data: torch.Tensor,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int | None = None,
        norm: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._update(name, data, None, sparsity_level, sparse_block_shape, zeros_per_block, norm)

    def _update_mask_and_masked(
        self, name: str, data: torch.Tensor, out: torch.Tensor, **config: Any
    ) -> bool:
        """The CPU kernel writes ``data * mask`` in its mask-writing pass (one pass over the
        data saved). A subclass with a rule of its own gets the base's two steps."""
        if type(self).update_mask is not DataNormSparsifier.update_mask:
            return super()._update_mask_and_masked(name, data, out, **config)
        return self._update(
            name,
            data,
            out,
            config["sparsity_level"],
            config["sparse_block_shape"],
            config.get("zeros_per_block"),
            config.get("norm"),
        )

    def _update(
        self,
        name: str,
        data: torch.Tensor,
        out: torch.Tensor | None,
        sparsity_level: float,
        sparse_block_shape: tuple[int, int],
        zeros_per_block: int | None,
        norm: str | None = None,
    ) -> bool:
        """Write the mask of ``name``; True when ``data * mask`` went into ``out`` as well.
        ``norm`` is the name's own (given to ``add_data``), else the constructor's."""
        norm = self.norm if norm is None else norm
        mask = self.get_mask(name)
        block = tuple(sparse_block_shape)
        k, zeros = _blocks_to_drop(data, sparsity_level, block, zeros_per_block)
        if k == 0:
            mask.fill_(1)
            return False
        if _norm_kernel.supports(data, mask, block, zeros):
            return _norm_kernel.write_mask(data, mask, k, block, zeros, norm, out)
        self._write_with_tensor_ops(mask, data, k, block, zeros, norm)
        return False

    def _write_with_tensor_ops(
        self,
        mask: torch.Tensor,
        data: torch.Tensor,
        k: int,
        block: tuple[int, int],
        zeros: int,
        norm: str,
    ) -> None:
        """The mask by plain tensor ops: CUDA, and what the compiled kernel does not take."""
        removed, values = _plan(data, k, block, norm)
        batch, height, width = values.shape
        rows, cols = removed.shape[1:]
        if (
            zeros == block[0] * block[1]
            and height == rows * block[0]
            and width == cols * block[1]
            and mask.is_contiguous()
        ):  # whole blocks tiling the matrix: broadcast each block's 0/1 into its entries
            keep = scratch("keep", removed.shape, mask.dtype, removed.device)
            keep = torch.logical_not(removed, out=keep).view(batch, rows, 1, cols, 1)
            mask.view(batch, rows, block[0], cols, block[1]).copy_(keep)
        else:
            mask.copy_(_drop_mask(removed, values, zeros, block).logical_not().reshape(mask.shape))
