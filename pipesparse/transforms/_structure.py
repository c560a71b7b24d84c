"""Find the entries of a batch to sparsify and rebuild the batch around their masked values.

A batch is a tensor, a numpy array, or any nesting of dicts (any ``Mapping``, e.g. a Hugging
Face ``BatchEncoding``), tuples (named or not), lists and dataclass instances (their fields). An entry is addressed by its path:
the keys / indices from the top of the batch down to it. Everything not replaced is returned
as the very same object.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Collection, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch

Path = tuple[Any, ...]


class BatchKeyError(KeyError):
    """A ``keys`` entry that the batch does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def is_float_array(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


_SCALARS = frozenset({str, bytes, int, float, bool, complex, type(None)})


def _is_dataclass(node: Any) -> bool:
    return dataclasses.is_dataclass(node) and not isinstance(node, type)


def _is_container(node: Any) -> bool:
    """Whether selection looks into ``node``: a mapping, tuple, list or dataclass."""
    return isinstance(node, (Mapping, tuple, list)) or _is_dataclass(node)


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, Mapping):
        return iter(node.items())
    if isinstance(node, (tuple, list)):
        return enumerate(node)
    if _is_dataclass(node):
        return ((field.name, getattr(node, field.name)) for field in dataclasses.fields(node))
    return iter(())


def _collect(
    node: Any, path: Path, found: list[tuple[Path, Any]], opaque: dict[type, Any] | None = None
) -> None:
    if isinstance(node, (torch.Tensor, np.ndarray)):
        if is_float_array(node):
            found.append((path, node))
        return
    if not _is_container(node):
        if opaque is not None:  # an object select does not look into: the first of its type
            opaque.setdefault(type(node), node)
        return
    for key, child in _children(node):
        if type(child) not in _SCALARS:  # lists of ids / strings are skipped cheaply
            _collect(child, path + (key,), found, opaque)


_OPAQUE_SCALARS = (str, bytes, bytearray, memoryview, range)
_LOOKED_AT = 1024  # items or attributes of an opaque object holds_float_array looks at


def holds_float_array(node: Any) -> bool:
    """Whether ``node``, an object :func:`select` does not look into, holds a floating tensor or
    array: among its first items (a deque, a set ...) or attributes (``__dict__`` and
    ``__slots__`` of an object of another class), or in dicts, tuples, lists or dataclasses
    there. Never consumes an iterator."""
    if isinstance(node, _OPAQUE_SCALARS):
        return False
    try:
        values = iter(node) if isinstance(node, Collection) else _attributes(node)
        found: list[tuple[Path, Any]] = []
        for value in itertools.islice(values, _LOOKED_AT):
            if type(value) not in _SCALARS:
                _collect(value, (), found)
                if found:
                    return True
    except Exception:  # a container that cannot be iterated or read: nothing to tell
        return False
    return False


def _attributes(node: Any) -> Iterator[Any]:
    """The attribute values of an object: its ``__dict__`` and its ``__slots__`` (a class
    made by ``attrs.define`` has only slots), in every class of its MRO."""
    attributes = getattr(node, "__dict__", None)
    if isinstance(attributes, dict):
        yield from attributes.values()
    for cls in type(node).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            if slot.startswith("__") and not slot.endswith("__"):  # a private name, mangled
                slot = f"_{cls.__name__.lstrip('_')}{slot}"
            try:
                yield getattr(node, slot)
            except AttributeError:  # a slot never set
                continue


def select(
    batch: Any, keys: tuple[Any, ...] | None, opaque: dict[type, Any] | None = None
) -> list[tuple[Path, Any]]:
    """``(path, entry)`` of the entries to sparsify: the top-level ``keys`` of the batch, or
    every floating tensor / array anywhere in it when ``keys`` is None; then the first object
    of each type it does not look into (anything but tensors, arrays, mappings, tuples, lists,
    dataclasses and scalars) goes into ``opaque``, if given, under its type."""
    if keys is None:
        found: list[tuple[Path, Any]] = []
        _collect(batch, (), found, opaque)
        return found
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"keys={list(keys)} selects entries of a dict, tuple or list batch; the batch is a "
            f"{type(batch).__name__} (use keys=None to sparsify it whole)"
        )
    if not _is_container(batch):
        raise TypeError(
            f"cannot select keys={list(keys)} from a batch of type {type(batch).__name__}; "
            "accepted: dict (any Mapping), tuple, list, dataclass"
        )
    entries = batch if not _is_dataclass(batch) else dict(_children(batch))
    selected = []
    for key in keys:
        if isinstance(batch, (tuple, list)) and isinstance(key, int) and -len(batch) <= key < 0:
            key += len(batch)  # the entry's own index: its path is where replace() puts it back
        if any(path == (key,) for path, _ in selected):
            raise ValueError(f"keys={list(keys)} selects entry {key!r} twice; name each entry once")
        try:
            entry = entries[key]
        except (KeyError, IndexError, TypeError):
            available = list(entries) if isinstance(entries, Mapping) else list(range(len(batch)))
            raise BatchKeyError(
                f"batch has no entry {key!r}; its entries are {available}"
            ) from None
        if not isinstance(entry, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"batch entry {key!r} is a {type(entry).__name__}; only torch.Tensor and "
                "numpy.ndarray entries can be sparsified"
            )
        selected.append(((key,), entry))
    return selected


def replace(batch: Any, new: dict[Path, Any]) -> Any:
    """``batch`` with the entry at each path of ``new`` replaced; untouched branches are the
    original objects."""
    prefixes = {path[:i] for path in new for i in range(len(path))}
    return _rebuild(batch, (), new, prefixes)


def _rebuild(node: Any, path: Path, new: dict[Path, Any], prefixes: set[Path]) -> Any:
    if path in new:
        return new[path]
    if path not in prefixes:
        return node
    items = {k: _rebuild(v, path + (k,), new, prefixes) for k, v in _children(node)}
    if isinstance(node, Mapping):
        return _rebuild_mapping(node, items)
    if _is_dataclass(node):
        return _rebuild_dataclass(node, items)
    values = list(items.values())
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple
        return type(node)(*values)
    if type(node) in (tuple, list):
        return type(node)(values)
    return _rebuild_sequence(node, values)


def _rebuild_mapping(node: Mapping, items: dict[Any, Any]) -> Mapping:
    if type(node) is dict:
        return items
    if isinstance(node, MutableMapping):  # OrderedDict, BatchEncoding (UserDict) ...
        out = copy.copy(node)  # keeps the mapping's own attributes
        originals = {key: node[key] for key, value in items.items() if value is not node[key]}
        for key in originals:
            out[key] = items[key]
        if all(node[key] is original for key, original in originals.items()):
            return out
        # the copy shares the batch's storage (a mapping without __copy__ that keeps its
        # entries in an inner dict): put the batch back, copy its containers but not its entries
        for key, original in originals.items():
            node[key] = original
        out = copy.deepcopy(node, {id(value): value for value in node.values()})
        for key in originals:
            out[key] = items[key]
        return out
    try:
        return type(node)(items)
    except Exception as err:
        raise TypeError(
            f"cannot rebuild a batch of type {type(node).__name__} (immutable mapping that does "
            "not take a dict in its constructor); pass a dict"
        ) from err


def _rebuild_dataclass(node: Any, items: dict[str, Any]) -> Any:
    changed = {key: value for key, value in items.items() if value is not getattr(node, key)}
    try:
        return dataclasses.replace(node, **changed)
    except (TypeError, ValueError) as err:  # a field with init=False, a __post_init__ ...
        raise TypeError(
            f"cannot rebuild a batch of type {type(node).__name__} with dataclasses.replace "
            f"({err}); pass a dict"
        ) from err


def _rebuild_sequence(node: Sequence, values: list[Any]) -> Sequence:
    try:
        return type(node)(values)
    except Exception as err:
        raise TypeError(
            f"cannot rebuild a batch of type {type(node).__name__} from a list of its entries; "
            "pass a tuple or list"
        ) from err
