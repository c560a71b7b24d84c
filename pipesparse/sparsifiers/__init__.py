"""Mask rules: one sparsifier per file, each overriding only ``update_mask``."""

from pipesparse.sparsifiers.norm import DataNormSparsifier
from pipesparse.sparsifiers.threshold import ThresholdSparsifier

__all__ = ["DataNormSparsifier", "ThresholdSparsifier"]
