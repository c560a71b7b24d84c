"""BaseDataSparsifier: a registry of named data, one mask per name, and the rule that updates it.

The reference (``torch.ao.pruning._experimental.data_sparsifier``) keeps data as buffers of
an ``nn.Module`` and masks as parametrizations. That breaks names such as ``"train"`` or
``"forward"`` and rebuilds a parametrization on every ``add_data``. Here data and masks are
plain tensors in dictionaries: re-registering a name is a dictionary update, and the masked
view is one multiply.
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pipesparse.errors import CorruptStateError, UnknownDataError

__all__ = [
    "BaseDataSparsifier",
    "STATE_FORMAT",
    "apply_mask",
    "data_names",
    "mask_like",
    "shares_entries",
    "widen_float8",
]

STATE_FORMAT = "pipesparse.data_sparsifier/1"
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
# dtypes a mask may have: 0/1 (or soft) values that multiply data of any real dtype
_MASK_DTYPES = {
    str(d): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,  # a mask has its data's dtype: unsigned data gives unsigned masks
        torch.uint32,
        torch.uint64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        # float8 holds 0 and 1 exactly (float8_e8m0fnu, powers of two only, has no 0)
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
    )
}


# a mask has its data's dtype, so data must be of a dtype a mask may have (and a state load)
_DATA_DTYPES = frozenset(_MASK_DTYPES.values())


def _as_tensor(name: str, data: Any) -> torch.Tensor:
    """The tensor behind ``data``: itself, or an embedding's weight (attached, not copied)."""
    if isinstance(data, _EMBEDDING_TYPES):
        _check_dtype(name, data.weight)
        return data.weight
    if isinstance(data, torch.Tensor):
        _check_layout(name, data)
        _check_dtype(name, data)
        return data
    raise TypeError(
        f"data for {name!r} has unsupported type {type(data).__name__}; accepted: torch.Tensor, "
        "nn.Parameter, nn.Embedding, nn.EmbeddingBag"
    )


def _check_layout(name: str, data: torch.Tensor) -> None:
    """Masks are dense tensors of the data's shape, multiplied into it: sparse data has none."""
    if data.layout != torch.strided:
        raise TypeError(
            f"data for {name!r} has layout {data.layout}; accepted: dense (torch.strided) "
            "tensors (convert it with .to_dense())"
        )


def _check_dtype(name: str, data: torch.Tensor) -> None:
    """Masks have the data's dtype: data of a dtype no mask may have (complex, float4,
    float8_e8m0fnu) is refused before anything is registered (rules could not read it, nor a
    state load it)."""
    if data.dtype not in _DATA_DTYPES:
        raise TypeError(
            f"data for {name!r} has dtype {data.dtype}; accepted: {', '.join(_MASK_DTYPES)}"
        )


def _plain(value: Any) -> Any:
    """``value`` with numpy (or other) real scalars as Python ints and floats, inside tuples
    and lists too: configs go into state_dicts, which ``torch.load(weights_only=True)`` only
    reads with Python numbers."""
    if isinstance(value, tuple):
        return tuple(map(_plain, value))
    if isinstance(value, list):
        return list(map(_plain, value))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value  # left to the rule's validation
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)  # also np.float64, a float subclass that pickles as numpy


def _given_mask(name: str, mask: Any, data: torch.Tensor) -> torch.Tensor:
    """The ``mask=`` of ``add_data``, checked: a tensor of the data's shape and a mask dtype, on
    the data's device (moved there if it is not), that torch can write in place."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.shape != data.shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the data has shape "
            f"{tuple(data.shape)}"
        )
    if str(mask.dtype) not in _MASK_DTYPES:
        raise TypeError(
            f"mask for {name!r} has dtype {mask.dtype}; accepted: {', '.join(_MASK_DTYPES)}"
        )
    if mask.layout != torch.strided:
        mask = mask.to_dense()
    if mask.requires_grad:
        mask = mask.detach()
    mask = mask.to(data.device)  # the same tensor when it is on the data's device already
    # rules and loads write it in place: torch refuses for entries that share memory, and for
    # an inference tensor outside inference mode
    inference = mask.is_inference() and not torch.is_inference_mode_enabled()
    if shares_entries(mask) or inference:
        raise ValueError(
            f"mask for {name!r} cannot be written in place: "
            + (
                "it is an inference tensor"
                if inference
                else f"entries of it share memory (strides {mask.stride()}, e.g. an expand())"
            )
            + "; pass mask.clone()"
        )
    return mask


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"data name must be a str, got {type(name).__name__}")
    if not name or "." in name:
        raise ValueError(f"invalid data name {name!r}: it must be a non-empty string without '.'")


def data_names(qualified: Iterable[str]) -> list[str]:
    """Data names for qualified module or parameter names, spelled as torch.ao spells them
    ("linears.0.weight" -> "linears_0_weight") and made unique by a number where two would be
    spelled alike ("a.b_c" and "a_b.c"): one name each, so no data replaces another's."""
    names: list[str] = []
    used: set[str] = set()
    for fqn in qualified:
        base = name = fqn.replace(".", "_")
        number = 1
        while name in used:
            name = f"{base}_{number}"
            number += 1
        used.add(name)
        names.append(name)
    return names


def _float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def widen_float8(data: torch.Tensor) -> torch.Tensor:
    """float8 data as float32, which holds it exactly (CPU has no comparison, sort or abs for
    float8); any other data as it is."""
    return data.float() if _float8(data.dtype) else data


def apply_mask(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``data * mask`` in the data's own dtype (a float mask must not promote float16 data)."""
    if _float8(data.dtype):  # CPU multiplies float8 only by float8, and not 0-d: in float32,
        return (data.float() * mask.float()).to(data.dtype)  # which holds it exactly
    out = data * mask_like(data, mask)
    return out if out.dtype == data.dtype else out.to(data.dtype)


def _zero_one(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is 0 or 1 (not a soft mask of a user's rule)."""
    return bool(((mask == 0) | (mask == 1)).all())


def mask_like(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A float mask in the dtype of float data, or of integer data when it is 0/1 (0 and 1 are
    exact in each): a float32 batch times a float64 mask, as ``fit`` leaves over features, was
    a promoting multiply 100x slower, and int64 data times a float32 mask lost every value
    above 2^24. A soft mask stays float for integer data (its product is cast back)."""
    if mask.dtype == data.dtype or not mask.is_floating_point():
        return mask
    if data.is_floating_point():
        return mask.to(data.dtype)
    if data.dtype != torch.bool and not data.is_complex() and _zero_one(mask):
        return mask.to(data.dtype)
    return mask


def _write_masked(data: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = :func:`apply_mask` ``(data, mask)``, into ``out`` (which may be ``data``)."""
    with torch.no_grad():
        mask = mask_like(data, mask)
        if not (_float8(data.dtype) or _float8(out.dtype)) and torch.can_cast(
            torch.result_type(data, mask), out.dtype
        ):
            torch.mul(data, mask, out=out)
        else:  # integer data and a soft mask (a float product, cast back as apply_mask does); float8
            out.copy_(apply_mask(data, mask))


def shares_entries(tensor: torch.Tensor) -> bool:
    """Whether some entries of ``tensor`` are one memory location (a dim of stride 0, as
    ``expand`` makes; torch's own test), so that torch refuses to write into it. Empty tensors
    have no entries to share, whatever their strides."""
    return tensor.numel() > 0 and any(
        stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def _check_writable(name: str, data: torch.Tensor) -> None:
    """Raise when torch refuses to write into ``data`` in place (:func:`shares_entries`)."""
    if shares_entries(data):
        raise ValueError(
            f"cannot write the mask of {name!r} into its data: entries of the data share memory "
            f"(shape {tuple(data.shape)}, strides {data.stride()}, e.g. an expand()); register "
            "a contiguous copy (add_data(name, data.contiguous())) to squash it"
        )


def _dtype_from_name(name: str, text: Any) -> torch.dtype:
    dtype = _MASK_DTYPES.get(text) if isinstance(text, str) else None
    if dtype is None:
        raise CorruptStateError(
            f"state_dict gives {name!r} the unknown mask dtype {text!r}; accepted: "
            f"{', '.join(_MASK_DTYPES)}"
        )
    return dtype


def _listed(names: Iterable[Any]) -> str:
    return "[" + ", ".join(sorted(map(repr, names))) + "]"


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as bool: exact, one byte per entry. torch.ao's sparse COO spends 8 bytes of
    index per dim on every kept entry (17+ bytes for a 2-D mask): larger than bool unless more
    than ~94% of the entries are zero."""
    mask = mask.detach()
    if mask.dtype == torch.bool:
        return mask.clone()
    if _zero_one(mask):
        return mask.to(torch.bool)
    return mask.clone()  # a soft mask (user rule) is kept as it is


class BaseDataSparsifier(abc.ABC):
    """Owns a mask for every piece of data registered under a name; ``step()`` updates them.

    Subclasses override one rule, :meth:`update_mask`, which edits ``self.get_mask(name)`` in
    place (``mask[...] = 0``, ``mask *= other`` and ``mask.data = ...`` all take effect; the mask
    keeps its storage, so masks placed in shared memory stay shared).

    Args:
        data_list: ``(name, data)`` pairs registered with the default config.
        **defaults: config every name starts from; per-name config in ``add_data`` overrides it.
    """

    #: the config keys the rule reads; ``add_data`` refuses any other (a typo such as
    #: ``sparsity=0.9`` would otherwise be kept and ignored). None: any key (a user's rule).
    config_keys: frozenset[str] | None = None

    def __init__(self, data_list: Iterable[tuple[str, Any]] | None = None, **defaults: Any):
        defaults = {key: _plain(value) for key, value in defaults.items()}
        self._validate_config(defaults)
        self.defaults: dict[str, Any] = defaults
        self.data_groups: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self._data: dict[str, torch.Tensor | None] = {}
        self._squashed: set[str] = set()
        self.enable_mask_update = True
        self._step_count = 0
        for name, data in data_list or ():
            self.add_data(name, data)

    # -- the rule ---------------------------------------------------------------------------
    @abc.abstractmethod
    def update_mask(self, name: str, data: torch.Tensor, **config: Any) -> None:
        """Edit ``self.get_mask(name)`` in place from ``data`` (unmasked) and the name's config."""

    def _validate_config(self, config: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for a config the rule cannot use; called before anything changes."""

    def _validate_data(self, name: str, data: torch.Tensor, config: Mapping[str, Any]) -> None:
        """Raise ``TypeError`` for data the rule cannot read (e.g. bool data for a norm rule),
        ``ValueError`` for data that the name's (valid) ``config`` cannot apply to; called
        before anything changes."""

    # -- registry ---------------------------------------------------------------------------
    def add_data(
        self, name: str, data: Any, reuse_mask: bool = True, **config: Any
    ) -> torch.Tensor:
        """Register ``data`` under ``name`` and return its masked view.

        An existing name keeps its config (updated by ``config``) and, with ``reuse_mask=True``,
        its mask; ``reuse_mask=False`` starts from an all-ones mask. ``mask=tensor`` (as in
        torch.ao) starts from that mask instead, attached (the rule edits it in place); it must
        have the data's shape and a mask dtype, and it is state, not config.
        """
        tensor = _as_tensor(name, data)
        entry = self.state.get(name) if isinstance(name, str) else None
        mask = entry["mask"] if entry is not None else None
        previous = self._data.get(name) if entry is not None else None
        if (
            reuse_mask
            and not config
            and mask is not None
            and previous is not None
            and previous.dtype == tensor.dtype
            and mask.shape == tensor.shape
            and mask.device == tensor.device
            and name not in self._squashed
        ):  # the per-batch path: a dictionary update
            self._data[name] = tensor
            return apply_mask(tensor, mask)

        _check_name(name)
        given = config.pop("mask", None)
        if given is not None:
            given = _given_mask(name, given, tensor)
        unknown = set(config) - self.config_keys if self.config_keys is not None else ()
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no config key {', '.join(map(repr, sorted(unknown)))}"
                f" (for {name!r}); its keys: {', '.join(sorted(self.config_keys))}"
            )
        config = {key: _plain(value) for key, value in config.items()}
        base = self.data_groups.get(name, self.defaults)
        merged = {**base, **config}
        if config:
            self._validate_config(merged)
        self._validate_data(name, tensor, merged)
        if given is not None:
            mask = given
        elif mask is not None and reuse_mask:
            if mask.shape != tensor.shape:
                raise ValueError(
                    f"cannot reuse the mask of {name!r}: mask has shape {tuple(mask.shape)}, new "
                    f"data has shape {tuple(tensor.shape)}; pass reuse_mask=False for a fresh mask"
                )
            if mask.device != tensor.device:
                mask = mask.to(tensor.device)
        else:
            mask = torch.ones_like(tensor, memory_format=torch.contiguous_format).detach()
        self.data_groups[name] = merged
        self.state[name] = {"mask": mask}
        self._data[name] = tensor
        self._squashed.discard(name)
        return apply_mask(tensor, mask)

    def _require(self, name: str) -> None:
        if name not in self.data_groups:
            raise UnknownDataError(name, list(self.data_groups))

    def _check_fits(self, name: str, data: torch.Tensor) -> None:
        """Raise when attached data no longer fits its mask: resized in place since it was
        registered (``data.data = ...``, ``resize_``)."""
        mask = self.state[name]["mask"]
        if data.shape != mask.shape:
            raise ValueError(
                f"the data of {name!r} now has shape {tuple(data.shape)}, but its mask has shape "
                f"{tuple(mask.shape)} (the data was resized in place since add_data); register "
                f"it again: add_data({name!r}, data, reuse_mask=False)"
            )

    def get_mask(self, name: str) -> torch.Tensor:
        """The live mask of ``name`` (edits to it take effect)."""
        self._require(name)
        return self.state[name]["mask"]

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        """The data of ``name``: unmasked (``return_original=True``) or ``data * mask``."""
        self._require(name)
        data = self._data[name]
        if data is None:
            raise ValueError(
                f"no data attached to {name!r} (loaded from a state without data); add_data first"
            )
        if name in self._squashed:
            if return_original:
                raise ValueError(
                    f"mask of {name!r} was squashed: the original data no longer exists"
                )
            return data
        if return_original:
            return data
        self._check_fits(name, data)
        return apply_mask(data, self.state[name]["mask"])

    def _forget(self, names: Iterable[str]) -> None:
        """Drop ``names`` with their data, masks and configs: for a copy that must not carry
        what it was last given (a transform's per-batch names)."""
        for name in names:
            for registry in (self.data_groups, self.state, self._data):
                registry.pop(name, None)
            self._squashed.discard(name)

    def is_squashed(self, name: str) -> bool:
        """Whether ``squash_mask`` stopped masking ``name`` (``step`` then skips it)."""
        self._require(name)
        return name in self._squashed

    # -- updates ----------------------------------------------------------------------------
    def step(self, masked_out: Mapping[str, torch.Tensor] | None = None) -> None:
        """Recompute every attached, unsquashed name's mask with :meth:`update_mask`.

        ``masked_out`` maps names to a tensor of their data's shape that receives the data
        masked by its new mask (``get_data(name, return_original=False)``, in the data's
        dtype); the data itself masks it in place, any other tensor must not overlap it. A rule
        may write it in the pass that writes the mask, saving a pass over the data
        (:class:`~pipesparse.DataNormSparsifier` does on CPU)."""
        self._check_masked_out(masked_out or {})
        if not self.enable_mask_update:
            for name, out in (masked_out or {}).items():
                _write_masked(self._data[name], self.state[name]["mask"], out)
            return
        self._check_updatable()
        self._step_count += 1
        # no_grad, called as a function: the context manager's objects cost ~15 us a step once
        # a batch has pushed the interpreter out of the CPU caches
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            for name, config in self.data_groups.items():
                data = self._data[name]
                if data is not None and name not in self._squashed:
                    out = masked_out.get(name) if masked_out else None
                    self._update_keeping_storage(name, data, config, out)
        finally:
            torch.set_grad_enabled(grad)

    def _check_updatable(self) -> None:
        """Raise before any mask changes when a name's config or data, edited since it was
        registered (``data_groups[name][...] = ...``, an in-place resize), is one the rule
        rejects: otherwise the names before it would already hold their new masks."""
        for name, config in self.data_groups.items():
            data = self._data[name]
            if data is not None and name not in self._squashed:
                self._check_fits(name, data)
                try:
                    self._validate_config(config)
                    self._validate_data(name, data, config)
                except (TypeError, ValueError) as err:
                    kind = TypeError if isinstance(err, TypeError) else ValueError
                    raise kind(f"cannot update the mask of {name!r}: {err}") from None

    def _check_masked_out(self, masked_out: Mapping[str, torch.Tensor]) -> None:
        """Raise before any mask changes when ``step``'s ``masked_out`` cannot be filled."""
        for name, out in masked_out.items():
            self._require(name)
            data = self._data[name]
            if data is None or name in self._squashed:
                state = "is squashed" if data is not None else "has no data attached"
                raise ValueError(f"masked_out names {name!r}, which {state}: nothing to mask")
            self._check_fits(name, data)
            if not isinstance(out, torch.Tensor) or out.shape != data.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"masked_out[{name!r}] must be a tensor of the data's shape "
                    f"{tuple(data.shape)}, got {shape}"
                )
            if out.device != data.device:
                raise ValueError(
                    f"masked_out[{name!r}] is on device {out.device}; the data of {name!r} is on "
                    f"{data.device}, where its masked data is written"
                )
            if shares_entries(out):
                raise ValueError(
                    f"masked_out[{name!r}] cannot be written: entries of it share memory (shape "
                    f"{tuple(out.shape)}, strides {out.stride()}, e.g. an expand()); pass a "
                    "tensor with its own memory for every entry"
                )

    def _update_mask_and_masked(
        self, name: str, data: torch.Tensor, out: torch.Tensor, **config: Any
    ) -> bool:
        """:meth:`update_mask`, and True when it also wrote ``data * new mask`` into ``out``
        (a rule that can do both in one pass overrides this; the base writes nothing)."""
        self.update_mask(name, data, **config)
        return False

    def _update_keeping_storage(
        self, name: str, data: torch.Tensor, config: dict, out: torch.Tensor | None = None
    ) -> None:
        mask = self.state[name]["mask"]
        storage = mask.detach()  # alias of the current storage, survives `mask.data = ...`
        if out is None:
            written = False
            self.update_mask(name, data, **config)
        else:
            written = self._update_mask_and_masked(name, data, out, **config)
        new = self.state[name]["mask"]
        if new is mask and new.data_ptr() == storage.data_ptr():
            if out is not None and not written:
                _write_masked(data, mask, out)
            return
        if not isinstance(new, torch.Tensor):
            self.state[name]["mask"] = mask
            mask.data = storage
            raise TypeError(
                f"update_mask for {name!r} stored a {type(new).__name__} as its mask; a mask is "
                f"a tensor of the data's shape {tuple(storage.shape)}"
            )
        if new.shape != storage.shape:
            produced = tuple(new.shape)
            self.state[name]["mask"] = mask
            mask.data = storage
            raise ValueError(
                f"update_mask for {name!r} produced a mask of shape {produced}; "
                f"the data has shape {tuple(storage.shape)}"
            )
        storage.copy_(new)
        mask.data = storage
        self.state[name]["mask"] = mask
        if out is not None:
            _write_masked(data, mask, out)

    def squash_mask(
        self, names: str | Iterable[str] | None = None, leave_parametrized: bool = True
    ) -> None:
        """Stop masking ``names`` (all when None); with ``leave_parametrized`` the mask is first
        written into the data itself, so the user's tensor (an embedding's weight) ends up sparse."""
        if names is None:
            names = list(self.data_groups)
        elif isinstance(names, str):
            names = [names]
        elif isinstance(names, Iterable) and not isinstance(names, torch.Tensor):
            names = list(names)
        else:
            raise TypeError(
                "squash_mask takes the names to squash: a str, an iterable of them or None "
                f"(all), got {type(names).__name__}"
            )
        for name in names:
            self._require(name)
            data = self._data[name]
            if leave_parametrized and name not in self._squashed and data is not None:
                self._check_fits(name, data)
                _check_writable(name, data)
        with torch.no_grad():
            for name in names:
                data = self._data[name]
                if name in self._squashed or data is None:
                    continue
                if leave_parametrized:
                    _write_masked(data, self.state[name]["mask"], data)
                self._squashed.add(name)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, include_data: bool = True) -> dict[str, Any]:
        """Masks (bool when 0/1), configs, data and squashed names; ``torch.save``-able and
        loadable with ``weights_only=True``. ``include_data=False`` leaves the data out (what
        sharing masks between processes needs)."""
        sd: dict[str, Any] = {
            "format": STATE_FORMAT,
            "state": {n: {"mask": _compact(s["mask"])} for n, s in self.state.items()},
            "mask_dtypes": {n: str(s["mask"].dtype) for n, s in self.state.items()},
            # plain again: a scheduler or an edit of data_groups may have put numpy values there
            "data_groups": {
                n: {key: _plain(value) for key, value in c.items()}
                for n, c in self.data_groups.items()
            },
            "squashed": sorted(self._squashed),
        }
        if include_data:
            sd["data"] = {n: d.detach() for n, d in self._data.items() if d is not None}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore masks, configs, data and squashed status. Validated whole before anything
        changes. ``strict=False`` keeps names that the state does not mention. A mask that
        already exists with the same shape is overwritten in place (shared memory stays
        shared) when its dtype holds the loaded values exactly (the saved dtype, or any 0/1
        mask), otherwise replaced by the loaded mask in its saved dtype;
        a name the state has no data for keeps the data it has, if the loaded mask and config fit
        it. torch.ao's format loads too."""
        entries = self._parse_state(state_dict)
        if strict:
            for name in [n for n in self.data_groups if n not in entries]:
                del self.data_groups[name], self.state[name], self._data[name]
                self._squashed.discard(name)
        for name, (mask, dtype, config, data, squashed) in entries.items():
            current = self.state.get(name, {}).get("mask")
            if _overwrites(current, mask, dtype):
                current.copy_(mask.to(current.device))
            else:  # a copy: two sparsifiers loaded from one state must not share a mask
                device = (
                    data.device
                    if data is not None
                    else current.device
                    if current is not None
                    else mask.device
                )
                current = mask.to(
                    device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format
                )
            self.state[name] = {"mask": current}
            self.data_groups[name] = config
            self._data[name] = data
            if squashed:
                self._squashed.add(name)
            else:
                self._squashed.discard(name)

    def _parse_state(self, sd: Any) -> dict[str, tuple]:
        if not isinstance(sd, Mapping):
            raise CorruptStateError(f"state_dict must be a dict, got {type(sd).__name__}")
        if "_container" in sd and "format" not in sd:
            sd = _from_reference_format(sd)
        fmt = sd.get("format", STATE_FORMAT)
        if fmt != STATE_FORMAT:
            raise CorruptStateError(
                f"state_dict has format {fmt!r}; this version reads {STATE_FORMAT!r}"
            )
        for key in ("state", "data_groups"):
            if not isinstance(sd.get(key), Mapping):
                raise CorruptStateError(
                    f"state_dict is missing the {key!r} dict (keys: {sorted(map(str, sd))})"
                )
        states, groups = sd["state"], sd["data_groups"]
        data_map = sd.get("data") or {}
        dtypes = sd.get("mask_dtypes") or {}
        squashed = sd.get("squashed") or ()
        for key, value in (("data", data_map), ("mask_dtypes", dtypes)):
            if not isinstance(value, Mapping):
                raise CorruptStateError(
                    f"state_dict {key!r} must be a dict, got {type(value).__name__}"
                )
        if not isinstance(squashed, (list, tuple, set, frozenset)) or not all(
            isinstance(n, str) for n in squashed
        ):
            raise CorruptStateError(
                f"state_dict 'squashed' must be a list of names, got {squashed!r}"
            )
        squashed = set(squashed)
        if set(states) != set(groups):
            raise CorruptStateError(
                f"state_dict names differ: masks for {_listed(states)}, configs for {_listed(groups)}"
            )
        unknown = (set(data_map) | squashed | set(dtypes)) - set(states)
        if unknown:
            raise CorruptStateError(
                f"state_dict refers to names without a mask: {_listed(unknown)}"
            )
        entries = {}
        for name, entry in states.items():
            try:
                _check_name(name)
            except (TypeError, ValueError) as err:
                raise CorruptStateError(f"state_dict has a bad name: {err}") from None
            mask = entry.get("mask") if isinstance(entry, Mapping) else None
            if not isinstance(mask, torch.Tensor):
                raise CorruptStateError(
                    f"state_dict mask for {name!r} is not a tensor: {type(mask).__name__}"
                )
            if mask.layout != torch.strided:
                mask = mask.to_dense()
            if str(mask.dtype) not in _MASK_DTYPES:
                raise CorruptStateError(
                    f"state_dict mask for {name!r} has dtype {mask.dtype}; accepted: "
                    f"{', '.join(_MASK_DTYPES)}"
                )
            config = groups[name]
            if not isinstance(config, Mapping):
                raise CorruptStateError(f"state_dict config for {name!r} is not a dict")
            config = dict(config)
            try:
                self._validate_config(config)
            except (TypeError, ValueError) as err:
                raise CorruptStateError(
                    f"state_dict config for {name!r} is invalid: {err}"
                ) from None
            data = data_map.get(name)
            if data is not None:
                if not isinstance(data, torch.Tensor) or data.shape != mask.shape:
                    got = (
                        tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
                    )
                    raise CorruptStateError(
                        f"state_dict data for {name!r} is {got}; its mask has shape "
                        f"{tuple(mask.shape)}"
                    )
                try:
                    _check_layout(name, data)
                    _check_dtype(name, data)
                    self._validate_data(name, data, config)
                except (TypeError, ValueError) as err:
                    raise CorruptStateError(f"state_dict data for {name!r}: {err}") from None
                data = data.detach().clone()  # the loaded sparsifier owns its data, as in torch.ao
            else:
                data = self._kept_data(name, mask, config, name in squashed)
            dtype = _dtype_from_name(name, dtypes[name]) if name in dtypes else mask.dtype
            entries[name] = (mask, dtype, config, data, name in squashed)
        return entries

    def _kept_data(
        self, name: str, mask: torch.Tensor, config: Mapping[str, Any], squashed: bool
    ) -> torch.Tensor | None:
        """The data ``name`` has now, kept by a load without data for it when the loaded mask,
        config and squashed status fit it (squashed data holds masked values, unsquashed data
        the originals); otherwise the name loads without data (``step`` skips it)."""
        data = self._data.get(name)
        if data is None or data.shape != mask.shape or (name in self._squashed) != squashed:
            return None
        try:
            self._validate_data(name, data, config)
        except (TypeError, ValueError):
            return None
        return data

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for name, config in self.data_groups.items():
            lines.append("\tData Group")
            lines.append(f"\t    name: {name}")
            lines.extend(f"\t    {key}: {config[key]}" for key in sorted(config))
        return "\n".join(lines) + "\n)"


def _overwrites(current: torch.Tensor | None, mask: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a load writes ``mask`` into the existing ``current`` in place: same shape, and
    a dtype that holds the loaded values exactly (the saved one, or any for a 0/1 mask; a soft
    0.5 copied into an integer mask would become 0). In place keeps a mask in shared memory
    shared with the DataLoader workers that read it."""
    return (
        current is not None
        and current.shape == mask.shape
        and (current.dtype == dtype or _zero_one(mask))
    )


def _from_reference_format(sd: Mapping[str, Any]) -> dict[str, Any]:
    """torch.ao's state_dict (masks as sparse COO, data in a container module) in this format."""
    container, states = sd["_container"], sd.get("state")
    if not isinstance(container, Mapping) or not isinstance(states, Mapping):
        raise CorruptStateError("torch.ao state_dict needs '_container' and 'state' dicts")
    data, squashed = {}, []
    for name in states:
        if name in container:  # parametrization removed: squashed
            data[name] = container[name]
            squashed.append(name)
        elif f"parametrizations.{name}.original" in container:
            data[name] = container[f"parametrizations.{name}.original"]
        else:
            raise CorruptStateError(f"torch.ao state_dict has no data for {name!r}")
    return {
        "state": states,
        "data_groups": sd.get("data_groups"),
        "data": data,
        "squashed": squashed,
    }
