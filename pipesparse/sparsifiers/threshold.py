"""ThresholdSparsifier: the seed's example rule, zero every entry with |x| < threshold."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from pipesparse.base import BaseDataSparsifier, widen_float8

__all__ = ["ThresholdSparsifier"]


class ThresholdSparsifier(BaseDataSparsifier):
    """Zero entries with ``|x| < threshold`` (NaN is kept). The mask is recomputed from scratch
    on every step (the seed's example only ever zeroes, so a mask could never recover).

    Args:
        data_list: ``(name, data)`` pairs to register.
        threshold: magnitude below which an entry is zeroed; per-name config may override it.
    """

    config_keys = frozenset({"threshold"})

    def __init__(self, data_list: list[tuple[str, Any]] | None = None, threshold: float = 0.1):
        super().__init__(data_list, threshold=threshold)

    def _validate_config(self, config: Mapping[str, Any]) -> None:
        threshold = config.get("threshold")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or math.isnan(threshold)
        ):
            raise ValueError(f"threshold must be a number, got {threshold!r}")

    def _validate_data(self, name: str, data: torch.Tensor, config: Mapping[str, Any]) -> None:
        if data.dtype == torch.bool or data.is_complex():
            raise TypeError(
                f"ThresholdSparsifier compares real magnitudes; {name!r} has dtype {data.dtype} "
                "(accepted: integer and floating dtypes)"
            )

    def update_mask(self, name: str, data: torch.Tensor, threshold: float, **kwargs: Any) -> None:  # type: ignore[override]
        # Not `data.abs()`: it overflows at the most negative integer (int8 -128 stays -128)
        if not data.is_floating_point():
            self.get_mask(name).copy_(_integers_kept(data, threshold))
            return
        data = widen_float8(data)
        bound = float(threshold)
        # zero |x| < threshold, so NaN (which compares false) is kept, never hidden
        below = (data < bound) & (data > -bound)
        self.get_mask(name).copy_(below.logical_not_())


def _integers_kept(data: torch.Tensor, threshold: float) -> torch.Tensor:
    """``|x| >= threshold`` for integer data, exactly: a float bound would promote the data to
    float32 (2**24 would pass a threshold of 2**24 + 1). For an integer, ``|x| >= t`` is
    ``|x| >= ceil(t)``; bounds outside the dtype's range are left out rather than wrapped, and
    unsigned dtypes without CPU comparisons are compared as int64."""
    if threshold <= 0 or math.isinf(threshold):
        fill = torch.ones if threshold <= 0 else torch.zeros
        return fill(data.shape, dtype=torch.bool, device=data.device)
    bound = int(threshold) if isinstance(threshold, numbers.Integral) else math.ceil(threshold)
    if data.dtype == torch.uint64:  # flipping the sign bit orders it as int64
        if bound > torch.iinfo(torch.uint64).max:
            return torch.zeros(data.shape, dtype=torch.bool, device=data.device)
        return torch.bitwise_xor(data.view(torch.int64), -(2**63)) >= bound - 2**63
    if data.dtype in (torch.uint16, torch.uint32):
        data = data.to(torch.int64)
    info = torch.iinfo(data.dtype)
    keep = (
        data >= bound
        if bound <= info.max
        else torch.zeros(data.shape, dtype=torch.bool, device=data.device)
    )
    return keep | (data <= -bound) if -bound >= info.min else keep
