import matplotlib.colors
import matplotlib.image
import pytest
import torch

from pipesparse.plot import _sample_colors, plot_masks, plot_samples


def test_mask_panels(tmp_path):
    masks = {"a": torch.tensor([[True, False] * 8]), "b": torch.ones(1, 4, 4, dtype=torch.bool)}
    path = plot_masks(masks, tmp_path / "sub" / "m.png", title="t")
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 100
    with pytest.raises(ValueError, match="no masks"):
        plot_masks({}, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("given", "written"), [("m", "m.png"), ("m.", "m.png"), ("m.svg", "m.svg")]
)
def test_the_returned_path_is_the_file_written(tmp_path, given, written):
    path = plot_masks({"a": torch.ones(1, 4, dtype=torch.bool)}, tmp_path / given)
    assert path == tmp_path / written and sorted(p.name for p in tmp_path.iterdir()) == [written]


def test_sample_grid(tmp_path):
    rows = [("in", torch.rand(3, 4, 4)), ("out", torch.rand(2, 4, 4)), ("1-d", torch.rand(3, 8))]
    path = plot_samples(rows, tmp_path / "s.png")
    assert matplotlib.image.imread(path).shape[0] > 100


@pytest.mark.parametrize("values", [[-1.0, 0.0, 1.0], [0.0, 0.5, 1.0]])
def test_sample_colors_tell_pruned_zeros_from_other_values(values):
    colors = _sample_colors(torch.tensor([values]))
    cmap = matplotlib.colormaps[colors["cmap"]]
    norm = matplotlib.colors.Normalize(colors["vmin"], colors["vmax"])
    drawn = {tuple(round(c, 3) for c in cmap(norm(v))) for v in values}
    assert len(drawn) == 3  # a negative value is not drawn as a zero is
    assert cmap(norm(0.0))[:3] == pytest.approx((1, 1, 1), abs=0.05)  # zero: white
