import pytest

from pipesparse.shards.config import make_sparsifier, parse_config, sparsifier_class
from pipesparse.sparsifiers import DataNormSparsifier, ThresholdSparsifier


def test_values_are_literals_or_strings():
    config = parse_config(
        ["sparsity_level=0.7", "sparse_block_shape=1,4", "zeros_per_block=None", "norm=L2", "n=2"]
    )
    assert config == {
        "sparsity_level": 0.7,
        "sparse_block_shape": (1, 4),
        "zeros_per_block": None,
        "norm": "L2",
        "n": 2,
    }


def test_code_is_never_evaluated():
    assert parse_config(["norm=__import__('os').getcwd()"]) == {"norm": "__import__('os').getcwd()"}


@pytest.mark.parametrize("item", ["sparsity_level", "=3", "bad key=1"])
def test_malformed_items_are_value_errors(item):
    with pytest.raises(ValueError, match="is not key=value"):
        parse_config([item])


def test_names_map_to_classes():
    from pipesparse.sparsifiers.nm import NMSparsifier

    assert sparsifier_class("norm") is DataNormSparsifier
    assert sparsifier_class("threshold") is ThresholdSparsifier
    assert sparsifier_class("nm") is NMSparsifier
    with pytest.raises(ValueError, match="unknown sparsifier 'l0'; accepted: norm, threshold, nm"):
        sparsifier_class("l0")


def test_unknown_key_lists_accepted_ones():
    with pytest.raises(ValueError, match="has no option sparsity; accepted: sparsity_level"):
        make_sparsifier("norm", {"sparsity": 0.5})


def test_bad_value_is_a_value_error():
    with pytest.raises(ValueError, match="bad --config for 'norm'"):
        make_sparsifier("norm", {"sparse_block_shape": (0, 4)})
    sparsifier = make_sparsifier("nm", {"n": 1, "m": 4})
    assert sparsifier.defaults == {"n": 1, "m": 4}
