"""Shared test settings and helpers.

Hypothesis runs without deadlines (2 shared CPU cores make timings meaningless) and with
modest example counts; tests that want more say so themselves.

Every Ray cluster a test starts listens on 127.0.0.1 only: on Linux Ray binds its servers to
every interface unless its clusters are off (its default on macOS and Windows). Ray reads the
switch when it is imported, and its workers inherit it, so it is set here before any test
imports Ray.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

settings.register_profile(
    "pipesparse",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("pipesparse")


def assert_same(a: Any, b: Any, where: str = "state_dict") -> None:
    """Deep equality of nested dicts/lists/tensors; tensors must match in dtype, shape, values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{where}: values")
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{where}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def same():
    """:func:`assert_same` as a fixture (test modules cannot import conftest by name)."""
    return assert_same


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, equal bit for bit (-0.0 and NaN payloads included), whatever the layout or
    autograd."""
    return a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(-1).view(torch.uint8),
        b.detach().contiguous().view(-1).view(torch.uint8),
    )


@pytest.fixture(scope="session")  # session: hypothesis tests may take it
def same_bits():
    """:func:`bits_equal` as a fixture."""
    return bits_equal


def run_python(script: Path, *args: str, timeout: int = 180) -> str:
    """Run ``script`` with this interpreter; its stdout, once it has exited with 0."""
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="session")
def run_script():
    """:func:`run_python` as a fixture (the examples and benchmarks run as scripts)."""
    return run_python


@pytest.fixture
def unchanged():
    """``with unchanged(sparsifier): ...``: the block must leave the sparsifier's state (masks,
    configs, data values, squashed names) and its live mask objects exactly as they were."""

    @contextlib.contextmanager
    def check(sparsifier) -> Iterator[None]:
        before = copy.deepcopy(sparsifier.state_dict())
        masks = {name: entry["mask"] for name, entry in sparsifier.state.items()}
        yield
        assert_same(before, sparsifier.state_dict())
        assert sparsifier.state.keys() == masks.keys()
        for name, mask in masks.items():
            assert sparsifier.state[name]["mask"] is mask, f"mask object of {name!r} replaced"

    return check
