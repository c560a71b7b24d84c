"""The torch.ao reference as a fixture: the differential oracle of the norm tests."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefNorm


def _torch_ao_mask(x: torch.Tensor, norm: str = "L1", **config) -> torch.Tensor:
    """The mask torch.ao's DataNormSparsifier computes for ``x`` in one step (its own dtype)."""
    reference = RefNorm(norm=norm, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on every registration
        reference.add_data("x", x.clone())
        reference.step()
    return reference.get_mask("x")


@pytest.fixture(scope="session")
def torch_ao_mask():
    """:func:`_torch_ao_mask` (session-scoped, so hypothesis tests may use it too)."""
    return _torch_ao_mask
