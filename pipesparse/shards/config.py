"""Sparsifiers by command-line name, and ``--config key=value`` parsed safely.

Values are Python literals read with :func:`ast.literal_eval` (never evaluated as code):
``sparsity_level=0.5`` is a float, ``sparse_block_shape=1,4`` a tuple, ``zeros_per_block=None``
None; anything that is not a literal (``norm=L2``) is a string.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

from pipesparse.base import BaseDataSparsifier

__all__ = ["SPARSIFIERS", "make_sparsifier", "parse_config", "sparsifier_class"]

SPARSIFIERS = {
    "norm": "pipesparse.sparsifiers.norm:DataNormSparsifier",
    "threshold": "pipesparse.sparsifiers.threshold:ThresholdSparsifier",
    "nm": "pipesparse.sparsifiers.nm:NMSparsifier",
}


def sparsifier_class(name: str) -> type[BaseDataSparsifier]:
    """The class behind a command-line sparsifier name (imported when first asked for)."""
    if name not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {name!r}; accepted: {', '.join(SPARSIFIERS)}")
    module, cls = SPARSIFIERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_config(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": literal}``; a malformed item is a ValueError."""
    config: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--config {item!r} is not key=value (e.g. sparsity_level=0.5)")
        config[key] = _value(text.strip())
    return config


def make_sparsifier(name: str, config: dict[str, Any]) -> BaseDataSparsifier:
    """A sparsifier ``name`` built with ``config``; unknown keys and bad values are ValueErrors."""
    cls = sparsifier_class(name)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "data_list")
    ]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(
            f"sparsifier {name!r} ({cls.__name__}) has no option {', '.join(unknown)}; accepted: "
            f"{', '.join(accepted)}"
        )
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad --config for {name!r} ({cls.__name__}): {err}") from None
