"""Pipeline adapters: one :class:`SparsifyTransform` wrapped for each kind of data pipeline."""

from pipesparse.transforms._mask_version import MaskWriteTimeout
from pipesparse.transforms.collate import SparsifyCollate
from pipesparse.transforms.core import SparsifyTransform, UnsupportedContainerWarning
from pipesparse.transforms.hf import hf_map_fn
from pipesparse.transforms.nodes import SparsifyNode
from pipesparse.transforms.sharing import sync_masks

__all__ = [
    "MaskWriteTimeout",
    "SparsifyCollate",
    "SparsifyNode",
    "SparsifyTransform",
    "UnsupportedContainerWarning",
    "hf_map_fn",
    "sync_masks",
]
