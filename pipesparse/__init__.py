"""pipesparse: data sparsifiers as composable PyTorch / Hugging Face data-pipeline transforms."""

from pipesparse.base import BaseDataSparsifier
from pipesparse.errors import CorruptStateError, UnknownDataError
from pipesparse.sparsifiers import DataNormSparsifier, ThresholdSparsifier

__all__ = [
    "BaseDataSparsifier",
    "CorruptStateError",
    "DataNormSparsifier",
    "ThresholdSparsifier",
    "UnknownDataError",
]
__version__ = "0.1.0"
