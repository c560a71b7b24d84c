"""Mask rules: one sparsifier per file, each overriding only ``update_mask``."""

from pipesparse.sparsifiers.nm import NMSparsifier
from pipesparse.sparsifiers.norm import DataNormSparsifier
from pipesparse.sparsifiers.threshold import ThresholdSparsifier

__all__ = ["DataNormSparsifier", "NMSparsifier", "ThresholdSparsifier"]
