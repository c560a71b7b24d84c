"""Pictures of masks and of rows before/after sparsifying (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["plot_masks", "plot_samples"]


def _image(tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D view to draw: leading 1-dims dropped, 1-D as one row, N-D rows stacked."""
    tensor = tensor.detach().float().cpu()
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, tensor.shape[-1])


def _figure(rows: int, cols: int, size: float = 2.2):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return plt, fig, axes


def _written_path(path: str | Path) -> Path:
    """The file ``savefig`` writes for ``path``: a name without an extension gets ``.png``
    (matplotlib would add it on its own), so the path returned is the file on disk."""
    path = Path(path)
    if not os.path.splitext(path.name)[1].lstrip("."):
        path = path.with_name(path.name.rstrip(".") + ".png")
    return path


def _save(plt, fig, path: str | Path, title: str) -> Path:
    """Title, lay out, write the image (creating its folder), free the figure; returns the
    path of the file written."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = _written_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_masks(masks: Mapping[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """One panel per mask (kept entries white, zeroed black), named with shape and sparsity."""
    if not masks:
        raise ValueError("no masks to plot")
    plt, fig, axes = _figure(1, len(masks), size=3.0)
    for ax, (name, mask) in zip(axes[0], masks.items(), strict=True):
        image = _image(mask.ne(0))
        sparsity = 1 - float(image.mean())
        ax.imshow(
            image,
            cmap="gray",
            vmin=0,
            vmax=1,
            aspect="auto" if image.shape[0] == 1 else "equal",
            interpolation="nearest",
        )
        ax.set_title(f"{name} {tuple(mask.shape)}\nsparsity {sparsity:.0%}", fontsize=9)
    return _save(plt, fig, path, title)


def _sample_colors(samples: torch.Tensor) -> dict[str, object]:
    """imshow's colours for a line of samples: 0 white in both, so pruned entries show; gray
    up to the largest value, or, when some are negative, blue below 0 and red above (gray
    from 0 would draw a negative value as white as a pruned one)."""
    scale = float(samples.detach().abs().max()) or 1.0
    if bool((samples.detach() < 0).any()):
        return {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}
    return {"cmap": "gray_r", "vmin": 0, "vmax": scale}


def plot_samples(
    rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, title: str = ""
) -> Path:
    """A grid: one labelled line per ``(label, samples)``, one column per sample (2-D each)."""
    count = max(len(samples) for _, samples in rows)
    plt, fig, axes = _figure(len(rows), count, size=1.4)
    for line, (label, samples) in enumerate(rows):
        colors = _sample_colors(samples)
        for col in range(count):
            ax = axes[line][col]
            if col < len(samples):
                image = _image(samples[col])
                aspect = "auto" if image.shape[0] == 1 else "equal"
                ax.imshow(image, aspect=aspect, interpolation="nearest", **colors)
            else:
                ax.axis("off")
        axes[line][0].set_ylabel(label, fontsize=8)
    return _save(plt, fig, path, title)
