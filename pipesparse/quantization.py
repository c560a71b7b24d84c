"""Sparsify and quantize a model's embeddings after training (torch.ao's recipe, zeros kept).

torch.ao's ``post_training_sparse_quantize`` quantizes with float zero points: a pruned 0.0 is
stored as ``round(zero_point)`` and dequantizes to ``(round(zp) - zp) * scale``, not 0, so about
9 of 50 % zeros survive. Here every row is quantized with an *integer* zero point (0.0 is then a
grid point) and a scale with 16 significant bits (so ``zero_point * scale`` is exact in float32
and the packed embedding kernels' ``q * scale + bias`` cancels to exactly 0.0 too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.ao.nn import quantized as nnq

from pipesparse.base import BaseDataSparsifier, data_names

__all__ = ["QuantizedEmbeddingBag", "post_training_sparse_quantize", "quantize_zero_exact"]

_SUPPORTED = (nn.Embedding, nn.EmbeddingBag)
_QMAX = 255  # torch.quint8
# the largest scale with 16 significant bits whose 128 steps stay within the float32 maximum
# ((2**24 - 1) * 2**104): a grid holding 0 has 128 steps on one side, and each grid point
# (q - zero_point) * scale must be a float32 (the kernels' bias, -zero_point * scale, too)
_MAX_SCALE = (2**16 - 1) * 2.0**105


def quantize_zero_exact(weight: torch.Tensor) -> torch.Tensor:
    """Per-row quint8 quantization (the scheme quantized embeddings need) that stores 0.0 exactly.

    The range of each row is widened to include 0; the error of any entry is at most half a
    step (at most 1.002 steps for an entry within a step of the float32 maximum, ~3.4e38, as
    every grid point must be a float32). The step is at least the smallest normal float32
    (~1.2e-38): smaller values round to 0.
    """
    w = weight.detach().float()
    fmax = torch.finfo(torch.float32).max
    # a row's range may pass the float32 maximum (3e38 - -3e38): it is computed in float64,
    # from each row's extremes (exact in float32), not from a float64 copy of the weight
    low = w.amin(dim=1).double().clamp(max=0)
    high = w.amax(dim=1).double().clamp(min=0)
    scale = (high - low) / _QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    mantissa, exponent = torch.frexp(scale)
    scale = torch.ldexp(torch.ceil(mantissa * 2**16) / 2**16, exponent)
    # (a row holding inf or NaN keeps its non-finite scale: it is NaN, as in torch.ao)
    scale = torch.where(scale.isfinite(), scale.clamp(max=_MAX_SCALE), scale)
    # a subnormal scale has an inverse that overflows float32 in the quantize kernels
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    steps = torch.floor(fmax / scale)  # steps from 0 whose grid points are float32: >= 128
    zero_point = torch.round(-low / scale).clamp(min=_QMAX - steps, max=steps).clamp(0, _QMAX)
    return torch.quantize_per_channel(w, scale, zero_point.float(), axis=0, dtype=torch.quint8)


class QuantizedEmbeddingBag(nnq.EmbeddingBag):
    """A quantized EmbeddingBag that reduces as ``nn.EmbeddingBag`` does where torch.ao's
    conversion does not: the quantized kernel only sums, so ``mode="mean"`` is divided by each
    bag's size here (an empty bag gives zeros), entries at ``padding_idx`` are left out of
    the sum and of the size (the kernel would add them in), and 2-D indices give one bag per
    row also with ``include_last_offset`` (the kernel would drop the last row's bag).
    Like torch.ao's quantized bags it compiles with ``torch.jit.script``."""

    def __init__(self, *args: Any, padding_idx: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.padding_idx = padding_idx

    def forward(  # type: ignore[override]
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
        compressed_indices_mapping: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # written for torch.jit.script, as torch.ao's quantized bags are: no super(), no
        # Optional attribute read twice, no int + bool; an op is no value there, so each
        # dtype's kernel is called on its own, as in nnq.EmbeddingBag.forward
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError("per_sample_weights needs an EmbeddingBag with mode='sum'")
        last = 1 if self.include_last_offset else 0
        if indices.dim() == 2:  # one bag per row, as in nn.EmbeddingBag
            if offsets is not None:  # they would be ignored: refused, as nn.EmbeddingBag does
                raise ValueError("2-D indices are one bag per row: offsets must be None with them")
            rows, width = indices.shape[0], indices.shape[1]
            offsets = torch.arange(rows + last, device=indices.device) * width
            indices = indices.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        if offsets is None:
            raise ValueError("1-D indices need offsets (the start of each bag)")
        padding_idx = self.padding_idx
        kept: torch.Tensor | None = None
        if padding_idx is not None:  # a weight of 0 leaves an entry out, 1 keeps it as it is
            kept = indices != padding_idx
            weights = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
            if per_sample_weights is not None:
                weights = per_sample_weights
            per_sample_weights = weights * kept
        if self.dtype == torch.quint4x2:
            out = torch.ops.quantized.embedding_bag_4bit(
                self._packed_params._packed_weight,
                indices,
                offsets,
                False,
                0,
                self.pruned_weights,
                per_sample_weights,
                compressed_indices_mapping,
                self.include_last_offset,
            )
        else:
            out = torch.ops.quantized.embedding_bag_byte(
                self._packed_params._packed_weight,
                indices,
                offsets,
                False,
                0,
                self.pruned_weights,
                per_sample_weights,
                compressed_indices_mapping,
                self.include_last_offset,
            )
        if self.mode != "mean":
            return out
        starts = offsets[: offsets.numel() - last]
        end = torch.full((1,), indices.numel(), dtype=offsets.dtype, device=offsets.device)
        ends = offsets[1:] if last == 1 else torch.cat([offsets[1:], end])
        if kept is None:
            sizes = ends - starts
        else:  # kept entries before each offset, by a running count
            zero = torch.zeros(1, dtype=torch.int64, device=kept.device)
            counted = torch.cat([zero, kept.to(torch.int64).cumsum(0)])
            sizes = counted[ends] - counted[starts]
        return out / sizes.clamp(min=1).unsqueeze(1).to(out.dtype)


def _requantize(dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_channel(
        dense,
        like.q_per_channel_scales(),
        like.q_per_channel_zero_points(),
        axis=like.q_per_channel_axis(),
        dtype=like.dtype,
    )


def _embeddings(
    model: nn.Module, select: Iterable[nn.Module] | None
) -> list[tuple[nn.Module, list[str]]]:
    """``(embedding, its qualified names)`` to convert; a module shared under several names is
    listed once with all of them."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if fqn and type(module) in _SUPPORTED:
            found.setdefault(id(module), (module, []))[1].append(fqn)
    if select is None:
        return _check_modes(list(found.values()))
    if isinstance(select, nn.Module):
        raise TypeError("select_embeddings must be a list of embedding modules, not one module")
    chosen: dict[int, tuple[nn.Module, list[str]]] = {}
    for module in select:
        if type(module) not in _SUPPORTED:
            raise TypeError(
                f"select_embeddings holds a {type(module).__name__}; accepted: nn.Embedding, "
                "nn.EmbeddingBag"
            )
        if id(module) not in found:
            raise ValueError(
                f"select_embeddings holds {module!r}, which is not a submodule of the model"
            )
        chosen[id(module)] = found[id(module)]
    return _check_modes(list(chosen.values()))


def _check_modes(
    embeddings: list[tuple[nn.Module, list[str]]],
) -> list[tuple[nn.Module, list[str]]]:
    for module, fqns in embeddings:
        if getattr(module, "mode", "sum") not in ("sum", "mean"):
            raise ValueError(
                f"EmbeddingBag {fqns[0]!r} has mode={module.mode!r}; quantized bags support "
                "'sum' and 'mean'"
            )
    return embeddings


def _quantized_module(module: nn.Module, qweight: torch.Tensor) -> nn.Module:
    """The module torch.ao's ``convert`` would put in place of ``module``, holding ``qweight``."""
    if type(module) is nn.Embedding:
        qmodule = nnq.Embedding(module.num_embeddings, module.embedding_dim, dtype=torch.quint8)
    else:
        plain = (
            module.mode == "sum" and module.padding_idx is None and not module.include_last_offset
        )
        extra = {} if plain else {"padding_idx": module.padding_idx}
        qmodule = (nnq.EmbeddingBag if plain else QuantizedEmbeddingBag)(
            module.num_embeddings,
            module.embedding_dim,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            mode=module.mode,
            sparse=module.sparse,
            include_last_offset=module.include_last_offset,
            dtype=torch.quint8,
            **extra,
        )
    qmodule.set_weight(qweight)
    return qmodule


def post_training_sparse_quantize(
    model: nn.Module,
    data_sparsifier_class: type[BaseDataSparsifier],
    sparsify_first: bool = True,
    select_embeddings: Iterable[nn.Module] | None = None,
    **sparse_config,
) -> nn.Module:
    """Sparsify and quantize (quint8, per row) the embeddings of ``model`` in place.

    Every ``nn.Embedding``/``nn.EmbeddingBag`` submodule (nested ones too), or only those in
    ``select_embeddings``, is replaced by its ``torch.ao.nn.quantized`` counterpart, as
    torch.ao's function does; other modules are untouched (but see ``sparsify_first`` for
    tied weights). Pruned entries dequantize to exactly
    0.0, in both orders.

    Args:
        model: the model whose embeddings are converted (modified in place and returned).
        data_sparsifier_class: a :class:`~pipesparse.BaseDataSparsifier` subclass, built with
            ``**sparse_config``.
        sparsify_first: True: prune the float weights (which are left pruned in the original
            modules, as in the reference, and so in any module whose weight is tied to one of
            them), then quantize. False: quantize, prune the dequantized
            weights (the values the quantized model sees), requantize with the same parameters.
        select_embeddings: the embedding modules to convert; None: all of them.
        **sparse_config: arguments of ``data_sparsifier_class``.
    """
    if not (
        isinstance(data_sparsifier_class, type)
        and issubclass(data_sparsifier_class, BaseDataSparsifier)
    ):
        raise TypeError(
            f"data_sparsifier_class must be a pipesparse.BaseDataSparsifier subclass, got "
            f"{data_sparsifier_class!r}"
        )
    embeddings = _embeddings(model, select_embeddings)
    sparsifier = data_sparsifier_class(**sparse_config)
    names = data_names(fqns[0] for _, fqns in embeddings)

    if sparsify_first:
        for name, (module, _) in zip(names, embeddings, strict=True):
            sparsifier.add_data(name, module)
        sparsifier.step()
        sparsifier.squash_mask()  # writes the pruned values into the modules' own weights
        qweights = [quantize_zero_exact(module.weight) for module, _ in embeddings]
    else:
        quantized = [quantize_zero_exact(module.weight) for module, _ in embeddings]
        dense = [q.dequantize() for q in quantized]
        for name, weight in zip(names, dense, strict=True):
            sparsifier.add_data(name, weight)
        sparsifier.step()
        sparsifier.squash_mask()
        qweights = [_requantize(d, q) for d, q in zip(dense, quantized, strict=True)]

    for (module, fqns), qweight in zip(embeddings, qweights, strict=True):
        qmodule = _quantized_module(module, qweight)
        for fqn in fqns:
            parent, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent), attr, qmodule)
    return model
