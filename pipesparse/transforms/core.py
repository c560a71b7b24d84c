"""SparsifyTransform: one sparsifier applied to every batch of a data pipeline.

Every adapter (collate hook, Hugging Face map, torchdata node, offline shards) wraps one of
these. The transform talks to its sparsifier only through the public API (``add_data``,
``step``, ``get_mask``, ``state_dict``, ``load_state_dict``).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipesparse.base import (
    BaseDataSparsifier,
    apply_mask,
    data_names,
    mask_like,
    shares_entries,
)
from pipesparse.errors import CorruptStateError
from pipesparse.transforms import _structure
from pipesparse.transforms._mask_version import MaskVersion

__all__ = [
    "SparsifyTransform",
    "TRANSFORM_STATE_FORMAT",
    "UnsupportedContainerWarning",
    "entry_mask_names",
]

TRANSFORM_STATE_FORMAT = "pipesparse.transform/1"
_UPDATES = ("every_batch", "frozen")
_MASK_OVER = ("batch", "features")
_SUMMED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # mean |x| in own dtype


class UnsupportedContainerWarning(UserWarning):
    """A ``keys=None`` transform met floating tensors or arrays inside an object it does not
    look into (a deque, a set, an object of another class): they come back unmasked."""


def _type_name(kind: type) -> str:
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def entry_mask_names(name: str, paths: list[tuple[Any, ...]]) -> list[str]:
    """The mask names of a transform called ``name`` for entries at ``paths``: ``name``, or
    with several entries ``f"{name}_{key}"`` each, the keys of a path joined by ``_`` (``.``
    in a key as ``_``), numbered where two would be alike."""
    if len(paths) == 1:
        return [name]
    return data_names(f"{name}_{'_'.join(str(p) for p in path)}" for path in paths)


def _check_update(update: Any) -> None:
    if update in _UPDATES and isinstance(update, str):
        return
    if isinstance(update, int) and not isinstance(update, bool) and update >= 1:
        return
    raise ValueError(
        f"update={update!r} is not a policy; accepted: 'every_batch', 'frozen', or an int N >= 1 "
        "(recompute the mask every N batches)"
    )


def _check_keys(keys: Any) -> tuple[Any, ...] | None:
    if keys is None:
        return None
    if isinstance(keys, (str, int)) and not isinstance(keys, bool):
        return (keys,)
    if isinstance(keys, Iterable):
        keys = tuple(keys)
        if keys and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
            return keys
    raise ValueError(
        f"keys={keys!r} is not accepted; pass None (every floating tensor), a dict key, a tuple/"
        "list index, or a non-empty list of them"
    )


def _resolve_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"SparsifyTransform(device={device!r}): CUDA is not available, batches stay on the "
            "CPU and masks are computed there",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return resolved


def _plain_float(tensor: torch.Tensor) -> bool:
    """A float tensor without autograd: masking it keeps its dtype and needs no graph, so the
    sparsifier's step can write the masked batch (as :func:`~pipesparse.base.apply_mask`)."""
    return tensor.is_floating_point() and not tensor.requires_grad


def _private(ready: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``ready`` (the mask as the multiply takes it), a copy if it is the shared mask itself: an
    in-place multiply cannot be redone if the mask changed under it."""
    return ready.clone() if ready is mask else ready


def _normal_mode() -> AbstractContextManager[Any]:
    """Around every write of masks and slots, which outlive the call: made under
    ``torch.inference_mode`` they would be inference tensors, which no call outside it may
    update in place (every later call of an ``every_batch`` transform would raise)."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()


def _in_dataloader_worker() -> bool:
    return get_worker_info() is not None


class SparsifyTransform:
    """Register each batch with a sparsifier under a fixed name and return it masked.

    Args:
        sparsifier: the rule (any :class:`~pipesparse.BaseDataSparsifier`); give the transform
            its own sparsifier, since every ``step()`` updates all its names.
        name: the name batches are registered under; with several selected entries each gets
            its own mask ``f"{name}_{key}"`` (``key`` is the index for tuples/lists).
        keys: which entries of a dict/tuple/list batch to sparsify; None: every floating tensor
            or numpy array anywhere in the batch's dicts, tuples, lists and dataclasses (floats
            in any other object, such as a deque, give an UnsupportedContainerWarning). Other
            entries pass through as the same objects.
        device: move the selected entries there before masking (masks are computed on the
            batch's device). ``"cuda"`` without CUDA warns once and stays on the CPU.
        update: ``"every_batch"`` (a fresh mask from each batch), ``"frozen"`` (fitted on the
            first batch, a calibration batch, or loaded with :meth:`load_state_dict`, then kept),
            or an int ``N`` (refitted on batches 0, N, 2N, ...; the counter is in the state).
        mask_over: ``"batch"``: the rule runs on the batch, the mask has the batch's shape.
            ``"features"``: the rule runs on mean ``|x|`` over dim 0, the mask has shape
            ``(1, *features)`` and broadcasts over any batch size. None: ``"batch"`` for
            ``every_batch``, ``"features"`` otherwise.
        numpy_to_torch: return masked numpy entries as tensors (default: numpy, same dtype).

    Persistent masks (``frozen``, ``N``) live in shared memory and ``load_state_dict`` / refits
    write into them in place, so DataLoader workers that are already running use a new mask from
    their next batch, never half of one (see ``_mask_version.MaskVersion``). Inside a
    DataLoader worker a persistent mask is never refitted (each worker would get its own
    mask); it must be fitted or loaded in the main process first.
    """

    def __init__(
        self,
        sparsifier: BaseDataSparsifier,
        name: str = "batch",
        keys: Any = None,
        device: Any = None,
        update: str | int = "every_batch",
        mask_over: str | None = None,
        numpy_to_torch: bool = False,
    ):
        if not isinstance(sparsifier, BaseDataSparsifier):
            raise TypeError(
                f"sparsifier must be a pipesparse BaseDataSparsifier, got {type(sparsifier).__name__}"
            )
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not name or "." in name:
            raise ValueError(f"name={name!r} is not accepted: a non-empty string without '.'")
        _check_update(update)
        if mask_over is not None and mask_over not in _MASK_OVER:
            raise ValueError(
                f"mask_over={mask_over!r} is not accepted; accepted: 'batch', 'features'"
            )
        if not isinstance(numpy_to_torch, bool):
            raise ValueError(f"numpy_to_torch must be True or False, got {numpy_to_torch!r}")
        self.sparsifier = sparsifier
        self.name = name
        self.keys = _check_keys(keys)
        self.device = device
        self.update = update
        self.mask_over = mask_over or ("batch" if update == "every_batch" else "features")
        self.numpy_to_torch = numpy_to_torch
        self._device = _resolve_device(device)
        self._batches_seen = 0
        self._mask_pid: int | None = None  # process that owns the every_batch masks
        self._slots: dict[str, torch.Tensor] = {}  # the tensors registered, see _repoint
        # persistent masks: their writer (this process) and its sequence counter, see _owned
        self._version = MaskVersion() if self.persistent else None
        # names of the types _select has looked into (names: picklable)
        self._checked_types: set[str] = set()

    # -- the per-batch path -----------------------------------------------------------------
    def __call__(self, batch: Any) -> Any:
        """The batch with the selected entries masked, same structure, others untouched."""
        return self._masked(batch, in_place=False)

    def apply_in_place(self, batch: Any) -> Any:
        """Like ``transform(batch)``, but multiply the selected tensors (and writable numpy
        arrays) by their masks in place, saving a batch-sized allocation and copy. Only for a
        batch the caller owns and nobody else reads, such as a fresh ``default_collate``
        output; ``transform(batch)`` never writes into the batch. An entry that requires grad
        is masked out of place, as ``transform(batch)`` does; an entry moved to ``device`` (or a
        numpy array that torch cannot view: read-only, reversed, non-native byte order) is
        masked in its new copy.
        Entries that share memory (with each other, or within one, as an ``expand()``) are all
        masked out of place, and so are batches holding an inference tensor."""
        return self._masked(batch, in_place=True)

    def _select(self, batch: Any, stacklevel: int) -> list[tuple[tuple[Any, ...], Any]]:
        """The entries to sparsify; with ``keys=None``, a warning for each type of object the
        transform cannot reach that holds floating data. Each type is looked into once, in the
        first batch it appears in (its first object there): a batch that carries, say, a list of
        256 records of a class costs one look, not 256 every batch."""
        opaque: dict[type, Any] = {}
        entries = _structure.select(batch, self.keys, opaque)
        for kind, node in opaque.items():
            name = _type_name(kind)
            if name in self._checked_types:
                continue
            self._checked_types.add(name)
            if not _structure.holds_float_array(node):
                continue
            warnings.warn(
                f"SparsifyTransform(keys=None) does not look into a {name}: the floating tensors "
                f"or arrays in it are returned unmasked. It looks into tensors, numpy arrays, dicts "
                f"(any Mapping), tuples, lists and dataclasses: make the {name} one of these "
                "(each type is looked into once per transform)",
                UnsupportedContainerWarning,
                stacklevel=stacklevel + 1,
            )
        return entries

    def _masked(self, batch: Any, in_place: bool) -> Any:
        entries = self._select(batch, stacklevel=3)
        if not entries:
            return batch
        names = self._mask_names([path for path, _ in entries])
        tensors = [self._to_tensor(entry) for _, entry in entries]
        if in_place and len(tensors) > 1:  # entries sharing memory would be masked twice
            in_place = len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
        if in_place:  # nor can torch write an entry whose elements share memory (an expand()),
            in_place = not any(  # nor an inference tensor, outside inference mode (see _fit)
                shares_entries(t) or t.is_inference() for t in tensors
            )
        fit = self._names_to_fit(names, tensors)
        if self.persistent and self._version.elsewhere:  # (where it never fits)
            outs = self._apply_shared(names, tensors, in_place)
        else:  # every kept mask checked before any mask or entry is written (in place)
            kept = {
                n: self._mask_for(n, t) for n, t in zip(names, tensors, strict=True) if n not in fit
            }
            products = {}
            if fit:
                pairs = [(n, t) for n, t in zip(names, tensors, strict=True) if n in fit]
                products = self._fit([n for n, _ in pairs], [t for _, t in pairs], in_place)
            outs = [
                products[n] if n in products else self._apply(n, t, in_place, kept.get(n))
                for n, t in zip(names, tensors, strict=True)
            ]
        masked = {
            path: self._from_tensor(out, entry)
            for out, (path, entry) in zip(outs, entries, strict=True)
        }
        self._batches_seen += 1
        return _structure.replace(batch, masked)

    def fit(self, batch: Any) -> None:
        """Compute the masks from ``batch`` now, whatever the policy (e.g. re-calibrate a frozen
        transform); running DataLoader workers see the new masks from their next batch."""
        entries = self._select(batch, stacklevel=2)
        if not entries:
            raise ValueError(
                f"fit needs a batch with a floating tensor or array to sparsify; got a "
                f"{type(batch).__name__} without one (keys={self.keys!r})"
            )
        self._check_owned("fit")
        names = self._mask_names([path for path, _ in entries])
        self._fit(names, [self._to_tensor(entry) for _, entry in entries])

    @property
    def persistent(self) -> bool:
        """True when the masks outlive a batch (``frozen`` or every ``N``)."""
        return self.update != "every_batch"

    def is_fitted(self, names: Iterable[str] | None = None) -> bool:
        """Whether a mask exists for each of ``names`` (default: ``[self.name]``)."""
        groups = self.sparsifier.data_groups
        return all(n in groups for n in (names or [self.name]))

    def _mask_names(self, paths: list[tuple[Any, ...]]) -> list[str]:
        return entry_mask_names(self.name, paths)

    def _owned(self) -> bool:
        """Whether this process writes the persistent masks: the one that created the
        transform (or a plain copy of it), not a worker process that shares its masks (forked,
        or handed the transform by multiprocessing: DataLoader, torchdata process workers)."""
        return not self._version.elsewhere

    def _check_owned(self, action: str) -> None:
        if self.persistent and not self._owned():
            raise ValueError(
                f"{action} in a worker process (pid {os.getpid()}) would rewrite the masks that "
                f"every process shares with the one that created the transform (pid "
                f"{self._version.writer}); call it there"
            )

    def _names_to_fit(self, names: list[str], tensors: list[torch.Tensor]) -> list[str]:
        """Of the batch's mask names, those to fit from it now: all (every batch, every Nth
        batch), or those without a mask yet (the others keep theirs), or none."""
        if not self.persistent:
            return names
        missing = [n for n in names if n not in self.sparsifier.data_groups]
        if _in_dataloader_worker() or not self._owned():
            if missing:
                raise ValueError(
                    f"SparsifyTransform(update={self.update!r}) has no mask for {missing} in this "
                    "worker process; workers only apply the masks of the process that created the "
                    "transform (so every worker uses the same ones): calibrate first with "
                    "transform(calibration_batch) or transform.load_state_dict(state) before "
                    "starting the workers"
                )
            return []
        if self.mask_over == "features" and any(len(t) == 0 for t in tensors if t.dim()):
            return missing  # no rows to refit from (see _summary): the masks are kept
        if self.update != "frozen" and self._batches_seen % self.update == 0:
            return names
        return missing

    def _fit(
        self, names: list[str], tensors: list[torch.Tensor], in_place: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Register the batch and step. With ``in_place`` (not None: the batch is masked next)
        and masks over the batch, the step also writes the masked batch (a rule may do it in
        the pass that writes the mask): returned by name, for the entries it covers."""
        pid = os.getpid()
        private = self.persistent or self._mask_pid == pid
        # the persistent masks as they were: the rule's step refits every name, and this fit
        # changes only those of ``names``, or none if it raises
        sparsifier = self.sparsifier
        before = {n: sparsifier.get_mask(n) for n in sparsifier.data_groups if self.persistent}
        copies = {n: mask.clone() for n, mask in before.items()}
        with self._writing_masks(), _normal_mode():
            fitted = False
            try:
                products = self._register_and_step(names, tensors, in_place, private)
                fitted = True
            finally:
                if self.persistent:
                    self._put_back(before, copies, names if fitted else ())
        if self.persistent:
            self.share_memory()
        else:  # every_batch masks are private to a process: workers must not write into
            self._mask_pid = pid  # the (shared) storage of the parent's masks
        return products

    def _put_back(
        self,
        before: dict[str, torch.Tensor],
        copies: dict[str, torch.Tensor],
        fitted: Iterable[str],
    ) -> None:
        """Every persistent mask but those of ``fitted`` back to its copy in ``before``; a name
        registered since (or given a mask of another shape) is dropped: the next batch that has
        it fits it."""
        sparsifier, fitted = self.sparsifier, set(fitted)
        dropped = [
            n
            for n in sparsifier.data_groups
            if n not in fitted and (n not in before or sparsifier.get_mask(n) is not before[n])
        ]
        sparsifier._forget(dropped)
        for name in dropped:
            self._slots.pop(name, None)
        for name, mask in before.items():
            if name not in fitted and name not in dropped:
                mask.copy_(copies[name])

    def _register_and_step(
        self,
        names: list[str],
        tensors: list[torch.Tensor],
        in_place: bool | None,
        private: bool,
    ) -> dict[str, torch.Tensor]:
        sparsifier = self.sparsifier
        products = {}
        # every entry's data checked first: one the rule cannot take changes no other's mask
        datas = [
            self._summary(name, tensor) if self.mask_over == "features" else tensor
            for name, tensor in zip(names, tensors, strict=True)
        ]
        if len(datas) > 1:
            for name, data in zip(names, datas, strict=True):
                sparsifier._validate_data(
                    name, data, sparsifier.data_groups.get(name, sparsifier.defaults)
                )
        for name, tensor, data in zip(names, tensors, datas, strict=True):
            reuse = (
                private
                and name in sparsifier.data_groups
                and sparsifier.get_mask(name).shape == data.shape
            )
            if not (reuse and self._repoint(name, data)):
                sparsifier.add_data(name, self._slot(name, data), reuse_mask=reuse)
            if in_place is not None and data is tensor and _plain_float(tensor):
                products[name] = tensor if in_place else torch.empty_like(tensor)
        sparsifier.step(masked_out=products or None)
        return products

    def _writing_masks(self) -> AbstractContextManager[None]:
        """Around a write into shared masks: readers in workers wait for it, never see half."""
        if self.persistent:  # (a persistent transform has its version from the start)
            return self._version.writing()
        return nullcontext()

    def _slot(self, name: str, data: torch.Tensor) -> torch.Tensor:
        """A tensor of this transform's own that views ``data``: what gets registered."""
        with torch.no_grad():
            slot = torch.empty(0, dtype=data.dtype, device=data.device).set_(data.detach())
        self._slots[name] = slot
        return slot

    def _repoint(self, name: str, data: torch.Tensor) -> bool:
        """Point the registered slot at ``data`` (data is attached, not copied, so the rule sees
        the new batch). Skips add_data's masked view, which the mask update makes stale at once:
        one multiply per batch (6-10% of an every_batch step). False when the slot is gone."""
        slot = self._slots.get(name)
        try:
            registered = self.sparsifier.get_data(name)
        except ValueError:  # squashed, or loaded without data
            return False
        if slot is None or registered is not slot or slot.dtype != data.dtype:
            return False
        if slot.shape != data.shape or slot.device != data.device:
            return False
        # no autograd on either side, so no no_grad context (~15 us in a DataLoader worker);
        # a batch without grad needs no detach either (one tensor op less)
        slot.set_(data.detach() if data.requires_grad else data)
        return True

    def _summary(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:
            raise ValueError(
                f"mask_over='features' needs a batch dim; the entry for {name!r} is a scalar"
            )
        if self.persistent and len(tensor) == 0:  # mean |x| over no rows: NaN, no mask to keep
            raise ValueError(
                f"the entry for {name!r} has no rows (shape {tuple(tensor.shape)}): a mask over "
                f"features (update={self.update!r}) is fitted on a batch with at least one row"
            )
        if tensor.dtype not in _SUMMED and not tensor.is_complex():
            tensor = tensor.float()  # before abs(): int8's abs(-128) is -128, and torch has no
        return tensor.abs().mean(dim=0, keepdim=True)  # abs or mean for bool, uint16, float8

    def _mask_for(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The mask of ``name``, checked against the batch entry it is to multiply."""
        mask = self.sparsifier.get_mask(name)
        if self.mask_over == "features":
            if tuple(mask.shape) != (1, *tensor.shape[1:]):
                raise ValueError(
                    f"mask {name!r} covers features of shape {tuple(mask.shape[1:])}; the batch "
                    f"entry has shape {tuple(tensor.shape)} (features {tuple(tensor.shape[1:])})"
                )
        elif mask.shape != tensor.shape:
            raise ValueError(
                f"mask {name!r} (update={self.update!r}, mask_over='batch') has shape "
                f"{tuple(mask.shape)}; the batch entry has shape {tuple(tensor.shape)}. Use "
                "mask_over='features' for a mask that broadcasts over any batch size"
            )
        return mask

    def _apply(
        self,
        name: str,
        tensor: torch.Tensor,
        in_place: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tensor`` times the mask of ``name`` (or ``mask``), in place where it may be."""
        mask = self._mask_for(name, tensor) if mask is None else mask
        ready = mask_like(tensor, mask.to(tensor.device))
        if (
            in_place
            and not tensor.requires_grad
            and torch.can_cast(torch.result_type(tensor, ready), tensor.dtype)
        ):
            return tensor.mul_(ready)
        return apply_mask(tensor, ready)

    def _apply_shared(
        self, names: list[str], tensors: list[torch.Tensor], in_place: bool
    ) -> list[torch.Tensor]:
        """:meth:`_apply` for every entry, with masks that another process may be rewriting:
        all of one batch read together, so from one fit; in place only with private copies of
        them (an in-place multiply cannot be redone if a mask changed under it)."""
        masks = [self._mask_for(n, t) for n, t in zip(names, tensors, strict=True)]
        if not in_place:
            return self._version.read(
                lambda: [
                    self._apply(n, t, False, m)
                    for n, t, m in zip(names, tensors, masks, strict=True)
                ]
            )
        copies = self._version.read(
            lambda: [
                _private(mask_like(t, m.to(t.device)), m)
                for t, m in zip(tensors, masks, strict=True)
            ]
        )
        return [self._apply(n, t, True, c) for n, t, c in zip(names, tensors, copies, strict=True)]

    def _to_tensor(self, entry: Any) -> torch.Tensor:
        if isinstance(entry, torch.Tensor) and entry.layout != torch.strided:
            raise TypeError(
                f"a batch entry has layout {entry.layout}; accepted: dense (torch.strided) "
                "tensors (convert it with .to_dense())"
            )
        if isinstance(entry, torch.Tensor) and entry.is_nested:
            raise TypeError(
                "a batch entry is a nested tensor; accepted: dense tensors of one shape (pad "
                "it with .to_padded_tensor(0))"
            )
        if isinstance(entry, np.ndarray):  # torch takes neither read-only nor reversed arrays,
            usable = (  # nor arrays in the other byte order (">f4" read from a file): copies
                entry.flags.writeable
                and entry.dtype.isnative
                and all(stride >= 0 for stride in entry.strides)
            )
            native = entry.dtype.newbyteorder("=")
            entry = torch.from_numpy(entry if usable else np.array(entry, dtype=native, order="C"))
        if self._device is not None and entry.device != self._device:
            entry = entry.to(self._device)
        return entry

    def _from_tensor(self, out: torch.Tensor, entry: Any) -> Any:
        if isinstance(entry, np.ndarray) and not self.numpy_to_torch:
            out = out.cpu().numpy()
            return out if out.dtype == entry.dtype else out.astype(entry.dtype)  # byte order
        return out

    def _without_batches(self) -> SparsifyTransform:
        """A copy of this transform; an ``every_batch`` one without the names it registers per
        batch (the last batch's data and masks): the same outputs, and a copy whose bytes do
        not depend on which batch it saw last."""
        snapshot = copy.deepcopy(self)
        snapshot._batches_seen = 0
        if not snapshot.persistent:
            snapshot.sparsifier._forget(list(snapshot._slots))
            snapshot._slots = {}
            if not snapshot.sparsifier.data_groups:
                snapshot.sparsifier._step_count = 0
        return snapshot

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mask_pid"] = None  # a copy (another process, a deepcopy) starts its own masks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_checked_types", set())  # pickled before there was one
        if self.persistent:
            if self.__dict__.get("_version") is None:  # pickled before there was one
                self._version = MaskVersion()
            if not self._version.elsewhere:  # a copy's masks: shared, as its original's were,
                self.share_memory()  # so that workers forked from it see its next fit

    # -- sharing and state ------------------------------------------------------------------
    def share_memory(self) -> SparsifyTransform:
        """Move the CPU masks into shared memory (done after every fit and load of a persistent
        transform); call it yourself if you fitted the sparsifier directly."""
        for name in self.sparsifier.data_groups:
            mask = self.sparsifier.get_mask(name)
            if mask.device.type == "cpu":
                mask.share_memory_()
        return self

    def _config(self) -> dict[str, Any]:
        return {"name": self.name, "update": self.update, "mask_over": self.mask_over}

    def state_dict(self) -> dict[str, Any]:
        """Masks and configs (no data) and the batch counter, under named keys."""
        return {
            "format": TRANSFORM_STATE_FORMAT,
            "config": self._config(),
            "batches_seen": self._batches_seen,
            "sparsifier": self.sparsifier.state_dict(include_data=False),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore masks and counter; masks of the same shape are overwritten in place (running
        workers see them). Raises CorruptStateError, leaving the state as it was, on junk."""
        if not isinstance(state_dict, Mapping):
            raise CorruptStateError(
                f"transform state must be a dict, got {type(state_dict).__name__}"
            )
        fmt = state_dict.get("format")
        if fmt != TRANSFORM_STATE_FORMAT:
            raise CorruptStateError(
                f"transform state has format {fmt!r}; this version reads {TRANSFORM_STATE_FORMAT!r}"
            )
        config = state_dict.get("config")
        if not isinstance(config, Mapping):
            raise CorruptStateError("transform state is missing its 'config' dict")
        for key in ("name", "mask_over"):
            if config.get(key) != getattr(self, key):
                raise CorruptStateError(
                    f"transform state was saved with {key}={config.get(key)!r}; this transform "
                    f"has {key}={getattr(self, key)!r}"
                )
        seen = state_dict.get("batches_seen")
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise CorruptStateError(
                f"transform state 'batches_seen' must be an int >= 0, got {seen!r}"
            )
        if not isinstance(state_dict.get("sparsifier"), Mapping):
            raise CorruptStateError("transform state is missing its 'sparsifier' dict")
        self._check_owned("load_state_dict")
        with self._writing_masks(), _normal_mode():
            self.sparsifier.load_state_dict(state_dict["sparsifier"])
        self._batches_seen = seen
        if self.persistent:
            self.share_memory()

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, changing nothing:
        it is loaded into a copy (which this process owns wherever it is made, so ownership is
        checked here first)."""
        self._check_owned("load_state_dict")
        self._without_batches().load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (
            f"SparsifyTransform({type(self.sparsifier).__name__}, name={self.name!r}, "
            f"keys={self.keys!r}, device={self.device!r}, update={self.update!r}, "
            f"mask_over={self.mask_over!r})"
        )
