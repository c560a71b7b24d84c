"""The public names of DESIGN.md, spelled as users and outside checks call them: import paths,
parameter names, their order and defaults. A rename or a reordered default would otherwise
break callers silently (the other tests mostly pass arguments by keyword)."""

import inspect

import pytest

import pipesparse
import pipesparse.cli
import pipesparse.shards
import pipesparse.transforms
from pipesparse import (
    BaseDataScheduler,
    BaseDataSparsifier,
    DataNormSparsifier,
    NMSparsifier,
    ThresholdSparsifier,
    post_training_sparse_quantize,
)
from pipesparse.transforms import (
    SparsifyCollate,
    SparsifyNode,
    SparsifyTransform,
    hf_map_fn,
    sync_masks,
)

E = inspect.Parameter.empty


def _params(func):
    """(name, default) of each parameter, ``**kw`` as ``"**kw"``, without ``self``."""
    out = []
    for p in inspect.signature(func).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            out.append((p.name, p.default))
    return out


def _starts_with(func, expected):
    """The DESIGN parameters first, in order, with their defaults (more may follow)."""
    got = _params(func)
    assert got[: len(expected)] == expected, f"{func.__qualname__}{inspect.signature(func)}"


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (BaseDataSparsifier.__init__, [("data_list", None), "**defaults"]),
        (BaseDataSparsifier.add_data, [("name", E), ("data", E), ("reuse_mask", True), "**config"]),
        (BaseDataSparsifier.get_data, [("name", E), ("return_original", True)]),
        (BaseDataSparsifier.get_mask, [("name", E)]),
        (BaseDataSparsifier.update_mask, [("name", E), ("data", E), "**config"]),
        (BaseDataSparsifier.squash_mask, [("names", None), ("leave_parametrized", True)]),
        (BaseDataSparsifier.load_state_dict, [("state_dict", E), ("strict", True)]),
        (
            DataNormSparsifier,
            [
                ("data_list", None),
                ("sparsity_level", 0.5),
                ("sparse_block_shape", (1, 4)),
                ("zeros_per_block", None),
                ("norm", "L1"),
            ],
        ),
        (NMSparsifier, [("data_list", None), ("n", 2), ("m", 4)]),
        (
            BaseDataScheduler,
            [("data_sparsifier", E), ("schedule_param", E), ("last_epoch", -1)],
        ),
        (
            post_training_sparse_quantize,
            [
                ("model", E),
                ("data_sparsifier_class", E),
                ("sparsify_first", True),
                ("select_embeddings", None),
                "**sparse_config",
            ],
        ),
        (
            SparsifyTransform,
            [
                ("sparsifier", E),
                ("name", "batch"),
                ("keys", None),
                ("device", None),
                ("update", "every_batch"),
                ("mask_over", None),
            ],
        ),
        (SparsifyTransform.__call__, [("batch", E)]),
        (SparsifyCollate, [("transform", E), ("collate_fn", None)]),
        (hf_map_fn, [("transform", E), ("columns", E)]),
        (SparsifyNode, [("source", E), ("transform", E)]),
        (sync_masks, [("transform", E), ("src", 0), ("group", None)]),
    ],
    ids=lambda v: getattr(v, "__qualname__", None),
)
def test_design_signatures(func, expected):
    _starts_with(func, expected)


def test_threshold_sparsifier_takes_data_list_then_threshold():
    names = [p if isinstance(p, str) else p[0] for p in _params(ThresholdSparsifier)]
    assert names[:2] == ["data_list", "threshold"]


def test_design_import_paths_and_attributes():
    for name in (
        "BaseDataSparsifier",
        "DataNormSparsifier",
        "ThresholdSparsifier",
        "NMSparsifier",
        "BaseDataScheduler",
        "post_training_sparse_quantize",
    ):
        assert name in pipesparse.__all__ and getattr(pipesparse, name)
    for name in ("SparsifyTransform", "SparsifyCollate", "hf_map_fn", "SparsifyNode", "sync_masks"):
        assert name in pipesparse.transforms.__all__
    assert callable(pipesparse.shards.preprocess) and callable(pipesparse.cli.main)
    sparsifier = DataNormSparsifier()
    assert sparsifier.data_groups == {} and sparsifier.state == {}
    transform = SparsifyTransform(DataNormSparsifier())
    assert callable(transform.state_dict) and callable(transform.load_state_dict)
    for command in ("demo", "fit", "preprocess", "inspect"):
        assert command in pipesparse.cli.build_parser().format_help()
