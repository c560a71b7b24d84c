"""ThresholdSparsifier: the seed's example rule, zero every entry with |x| < threshold."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from pipesparse.base import BaseDataSparsifier

__all__ = ["ThresholdSparsifier"]


class ThresholdSparsifier(BaseDataSparsifier):
    """Keep entries with ``|x| >= threshold``. The mask is recomputed from scratch on every step
    (the seed's example only ever zeroes, so a mask could never recover).

    Args:
        data_list: ``(name, data)`` pairs to register.
        threshold: magnitude below which an entry is zeroed; per-name config may override it.
    """

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
        # Not `data.abs()`: it overflows at the most negative integer (int8 -128 stays -128). A
        # float bound also keeps `-threshold` from wrapping around in unsigned dtypes.
        bound = float(threshold)
        self.get_mask(name).copy_((data >= bound) | (data <= -bound))
