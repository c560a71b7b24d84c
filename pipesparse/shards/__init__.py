"""Offline preprocessing of training shards: Parquet/Arrow in, sparsified Parquet out.

``preprocess`` (the ``pipesparse preprocess`` command) writes one output shard per input
shard and a manifest, atomically and resumably, on a local, ``datasets`` or Ray Data engine;
``fit`` computes per-feature masks from data; ``read_sparse`` reads an output shard back as
dense tensors.
"""

from pipesparse.shards.coo import read_sparse
from pipesparse.shards.errors import ManifestError, ShardError, ShardTypeError
from pipesparse.shards.fit import fit
from pipesparse.shards.manifest import Manifest
from pipesparse.shards.preprocess import Summary, preprocess
from pipesparse.shards.resume import ResumeRefusedError

__all__ = [
    "Manifest",
    "ManifestError",
    "ResumeRefusedError",
    "ShardError",
    "ShardTypeError",
    "Summary",
    "fit",
    "preprocess",
    "read_sparse",
]
