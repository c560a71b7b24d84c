import matplotlib.image
import pytest
import torch

from pipesparse.plot import plot_masks, plot_samples


def test_mask_panels(tmp_path):
    masks = {"a": torch.tensor([[True, False] * 8]), "b": torch.ones(1, 4, 4, dtype=torch.bool)}
    path = plot_masks(masks, tmp_path / "sub" / "m.png", title="t")
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 100
    with pytest.raises(ValueError, match="no masks"):
        plot_masks({}, tmp_path / "x.png")


def test_sample_grid(tmp_path):
    rows = [("in", torch.rand(3, 4, 4)), ("out", torch.rand(2, 4, 4)), ("1-d", torch.rand(3, 8))]
    path = plot_samples(rows, tmp_path / "s.png")
    assert matplotlib.image.imread(path).shape[0] > 100
