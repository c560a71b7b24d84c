"""DataNormSparsifier: zero the blocks with the lowest L1/L2 norm (torch.ao's rule, any rank).

The last two dims are the matrix that is cut into blocks; leading dims are a batch of
matrices, each masked on its own (1-D data is one row, 0-D one element). Block norms are
selected with ``kthvalue`` (O(n)) instead of the reference's full sort; ties are broken
towards the lower block index, so the result is deterministic everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from pipesparse.base import BaseDataSparsifier

__all__ = ["DataNormSparsifier"]

_NORMS = ("L1", "L2")


def _as_matrices(data: torch.Tensor) -> torch.Tensor:
    """(B, H, W) view: last two dims the matrix, leading dims flattened into B."""
    if data.dim() == 0:
        return data.reshape(1, 1, 1)
    if data.dim() == 1:
        return data.reshape(1, 1, -1)
    return data.reshape(-1, data.shape[-2], data.shape[-1])


def _elementwise_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()  # pooling in half precision loses the order of close norms
    return x.abs() if norm == "L1" else x * x


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, N): exactly the ``k`` smallest of each row; ties go to the lower index."""
    if values.is_floating_point():
        values = torch.where(values.isnan(), torch.inf, values)  # NaN sorts last, as in torch.sort
    threshold = values.kthvalue(k, dim=1, keepdim=True).values
    chosen = values <= threshold
    if bool((chosen.sum(dim=1) == k).all()):
        return chosen
    below = values < threshold
    tied = values == threshold
    room = k - below.sum(dim=1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=1) <= room))


def _lowest_in_block(blocks: torch.Tensor, zeros: int) -> torch.Tensor:
    """Bool (..., V): the ``zeros`` smallest entries of each block (NaN padding sorts last)."""
    order = torch.sort(blocks, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(blocks.shape[-1], device=blocks.device).expand_as(order)
    )
    return rank < zeros


def norm_keep_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: tuple[int, int],
    zeros_per_block: int | None,
    norm: str = "L1",
) -> torch.Tensor:
    """Bool mask of ``data``'s shape: True where the value is kept."""
    block_h, block_w = sparse_block_shape
    per_block = block_h * block_w
    zeros = per_block if zeros_per_block is None else zeros_per_block
    if data.numel() == 0 or sparsity_level <= 0 or zeros == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    values = _elementwise_norm(_as_matrices(data), norm)
    batch, height, width = values.shape
    rows, cols = math.ceil(height / block_h), math.ceil(width / block_w)
    num_blocks = rows * cols
    k = min(round(sparsity_level * num_blocks), num_blocks)
    if k == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)

    block_norms = F.avg_pool2d(
        values[:, None], sparse_block_shape, sparse_block_shape, ceil_mode=True
    )
    removed = _smallest(block_norms.reshape(batch, num_blocks), k).view(batch, rows, 1, cols, 1)
    if zeros == per_block:
        drop = removed.expand(batch, rows, block_h, cols, block_w)
    else:  # within removed blocks, drop only the `zeros` smallest entries
        padded = F.pad(
            values, (0, cols * block_w - width, 0, rows * block_h - height), value=math.nan
        )
        blocks = padded.view(batch, rows, block_h, cols, block_w).transpose(2, 3)
        lowest = _lowest_in_block(blocks.reshape(batch, rows, cols, per_block), zeros)
        lowest = lowest.view(batch, rows, cols, block_h, block_w).transpose(2, 3)
        drop = removed & lowest
    keep = ~drop.reshape(batch, rows * block_h, cols * block_w)[:, :height, :width]
    return keep.reshape(data.shape)


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
        norm: ``"L1"`` (mean |x|) or ``"L2"`` (mean x**2).
    """

    def __init__(
        self,
        data_list: list[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
    ):
        if norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; accepted: {', '.join(_NORMS)}")
        self.norm = norm
        super().__init__(
            data_list,
            sparsity_level=sparsity_level,
            sparse_block_shape=tuple(sparse_block_shape),
            zeros_per_block=zeros_per_block,
        )

    def _validate_config(self, config: Mapping[str, Any]) -> None:
        level = config.get("sparsity_level")
        if isinstance(level, bool) or not isinstance(level, (int, float)) or math.isnan(level):
            raise ValueError(f"sparsity_level must be a number, got {level!r}")
        shape = config.get("sparse_block_shape")
        if (
            not isinstance(shape, (tuple, list))
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(
                f"sparse_block_shape must be two positive ints (height, width), got {shape!r}"
            )
        zeros = config.get("zeros_per_block")
        if zeros is not None:
            if isinstance(zeros, bool) or not isinstance(zeros, int):
                raise ValueError(f"zeros_per_block must be an int or None, got {zeros!r}")
            if not 0 <= zeros <= shape[0] * shape[1]:
                raise ValueError(
                    f"zeros_per_block={zeros} is outside 0..{shape[0] * shape[1]} (the entries of a "
                    f"{shape[0]}x{shape[1]} block)"
                )

    def _validate_data(self, name: str, data: torch.Tensor) -> None:
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
        **kwargs: Any,
    ) -> None:
        keep = norm_keep_mask(
            data, sparsity_level, tuple(sparse_block_shape), zeros_per_block, self.norm
        )
        self.get_mask(name).copy_(keep)
