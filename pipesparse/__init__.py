"""pipesparse: data sparsifiers as composable PyTorch / Hugging Face data-pipeline transforms."""

from pipesparse.base import BaseDataSparsifier
from pipesparse.errors import CorruptStateError, UnknownDataError
from pipesparse.quantization import post_training_sparse_quantize
from pipesparse.scheduler import BaseDataScheduler, CubicSparsityScheduler, LinearSparsityScheduler
from pipesparse.sparsifiers import DataNormSparsifier, NMSparsifier, ThresholdSparsifier

__all__ = [
    "BaseDataScheduler",
    "BaseDataSparsifier",
    "CorruptStateError",
    "CubicSparsityScheduler",
    "DataNormSparsifier",
    "LinearSparsityScheduler",
    "NMSparsifier",
    "ThresholdSparsifier",
    "UnknownDataError",
    "post_training_sparse_quantize",
]
__version__ = "0.1.0"
