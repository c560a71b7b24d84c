"""NMSparsifier: keep the ``n`` largest-magnitude entries of every ``m`` consecutive ones (2:4).

N:M structured sparsity along the last dim is what sparse tensor cores accelerate (2:4 on
NVIDIA Ampere and later). The rule is vectorised over a ``(..., groups, m)`` view of the data,
any rank, on the data's device. Ties are broken towards the lower index (a stable sort), so the
mask is the same on every device and every run. NaN counts as the largest magnitude (as in
``torch.sort``): it is kept, never hidden by the mask.

The last dim must be a multiple of ``m``: a partial group has no N:M hardware layout, so it is a
``ValueError`` naming the shape (pad the features to a multiple of ``m`` first).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from pipesparse.base import BaseDataSparsifier, widen_float8

__all__ = ["NMSparsifier", "nm_keep_mask", "to_semi_structured"]

_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def nm_keep_mask(data: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of ``data``'s shape: True for the ``n`` largest |x| of each group of ``m``."""
    if data.dim() == 0 or data.shape[-1] % m:
        raise ValueError(
            f"N:M sparsity needs the last dim to be a multiple of m={m}; got shape "
            f"{tuple(data.shape)}"
        )
    if n == m or data.numel() == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    if n == 0:
        return torch.zeros(data.shape, dtype=torch.bool, device=data.device)
    key, descending = _magnitude_key(data.detach())
    groups = key.reshape(*data.shape[:-1], data.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=descending, stable=True).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=data.device)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(data.shape)


def _magnitude_key(data: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A key that sorts as |x| and whether it sorts descending. Signed integers rank by -|x|,
    not ``abs()``, which overflows at the most negative value (int8 -128 stays -128, the
    smallest instead of the largest); unsigned ones are their own magnitude."""
    if data.is_floating_point():
        return widen_float8(data).abs(), True
    if data.is_signed():
        return torch.minimum(data, data.neg()), False  # -|x|: the negation wraps only at the min
    return data, True


def to_semi_structured(masked: torch.Tensor) -> torch.Tensor:
    """``masked`` (already 2:4) as ``torch.sparse.to_sparse_semi_structured``, which needs a
    2-D float16/bfloat16 CUDA tensor; off CUDA the dense tensor is returned unchanged.
    The conversion trusts the 2:4 pattern: entries beyond two per group would be dropped."""
    if masked.device.type != "cuda":
        return masked
    if masked.dim() != 2 or masked.dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ValueError(
            "a semi-structured sparse tensor needs 2-D float16/bfloat16 data; got shape "
            f"{tuple(masked.shape)} with dtype {masked.dtype}"
        )
    return torch.sparse.to_sparse_semi_structured(masked)


def _check_nm(n: Any, m: Any) -> None:
    for key, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{key} must be an int, got {value!r}")
    if m <= 0 or not 0 <= n <= m:
        raise ValueError(f"N:M sparsity needs 0 <= n <= m and m > 0; got n={n}, m={m}")


class NMSparsifier(BaseDataSparsifier):
    """Keep the ``n`` largest |x| of every ``m`` consecutive entries along the last dim.

    Args:
        data_list: ``(name, data)`` pairs to register.
        n: entries kept per group; per-name config in ``add_data`` may override it.
        m: group size; the last dim of the data must be a multiple of it.
        semi_structured: return masked data (``add_data``, ``get_data(return_original=False)``)
            as ``torch.sparse.to_sparse_semi_structured``, the layout sparse tensor cores
            multiply fast. Needs 2:4 and 2-D float16/bfloat16 CUDA data. On a machine or
            tensor without CUDA the dense masked tensor is returned, with one warning; before
            the first ``step()`` (mask all ones, data not 2:4 yet) the dense tensor too.
    """

    config_keys = frozenset({"n", "m"})

    def __init__(
        self,
        data_list: list[tuple[str, Any]] | None = None,
        n: int = 2,
        m: int = 4,
        semi_structured: bool = False,
    ):
        if semi_structured and (n, m) != (2, 4):
            raise ValueError(f"semi_structured needs 2:4 sparsity, got n={n}, m={m}")
        self.semi_structured = semi_structured
        self._warned_dense = False
        super().__init__(data_list, n=n, m=m)

    def _validate_config(self, config: Mapping[str, Any]) -> None:
        _check_nm(config.get("n"), config.get("m"))

    def _validate_data(self, name: str, data: torch.Tensor, config: Mapping[str, Any]) -> None:
        if data.dtype == torch.bool or data.is_complex():
            raise TypeError(f"NMSparsifier ranks real magnitudes; {name!r} has dtype {data.dtype}")
        if self.semi_structured and (config["n"], config["m"]) != (2, 4):
            raise ValueError(
                f"semi_structured needs 2:4 sparsity; {name!r} is configured "
                f"{config['n']}:{config['m']}"
            )
        if data.dim() == 0:
            raise ValueError(f"N:M sparsity needs at least one dim; {name!r} is a scalar")
        if data.shape[-1] % config["m"]:
            raise ValueError(
                f"N:M sparsity needs the last dim of {name!r} to be a multiple of "
                f"m={config['m']}; got shape {tuple(data.shape)} (pad the features first)"
            )

    def add_data(
        self, name: str, data: Any, reuse_mask: bool = True, **config: Any
    ) -> torch.Tensor:
        return self._emit(name, super().add_data(name, data, reuse_mask, **config))

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        data = super().get_data(name, return_original)
        return data if return_original else self._emit(name, data)

    def _emit(self, name: str, masked: torch.Tensor) -> torch.Tensor:
        if not self.semi_structured:
            return masked
        config = self.data_groups[name]
        if (config["n"], config["m"]) != (2, 4):
            raise ValueError(
                f"semi_structured needs 2:4 sparsity; {name!r} is configured "
                f"{config['n']}:{config['m']}"
            )
        if masked.device.type != "cuda":
            if not self._warned_dense:
                self._warned_dense = True
                warnings.warn(
                    f"semi_structured asked for {name!r} on {masked.device}: semi-structured "
                    "sparse tensors need CUDA, so the dense masked tensor is returned",
                    stacklevel=3,
                )
            return masked
        if not bool(self.get_mask(name).ne(0).reshape(-1, 4).sum(dim=1).le(2).all()):
            return masked  # before the first step() the mask is all ones: the data is not 2:4 yet
        return to_semi_structured(masked)

    def update_mask(self, name: str, data: torch.Tensor, n: int, m: int, **kwargs: Any) -> None:  # type: ignore[override]
        self.get_mask(name).copy_(nm_keep_mask(data, n, m))
