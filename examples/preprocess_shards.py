"""Sparsify Parquet training shards offline: fit masks, preprocess (resumably), read back.

    python examples/preprocess_shards.py [WORKDIR]

The same as `pipesparse fit` + `pipesparse preprocess` on the command line.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipesparse.shards import fit, preprocess, read_sparse


def make_shards(folder: Path) -> None:
    """Three shards of 64-d float32 embeddings (only 16 features carry signal) and a label."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        emb = rng.normal(scale=0.05, size=(500, 64)).astype(np.float32)
        emb[:, 16:32] += rng.normal(size=(500, 16)).astype(np.float32)
        table = pa.table(
            {"emb": pa.array(list(emb), pa.list_(pa.float32())), "y": rng.integers(0, 9, 500)}
        )
        pq.write_table(table, folder / f"train-{index:05d}.parquet")


def main(workdir: Path) -> None:
    make_shards(workdir / "shards")
    config = {"sparsity_level": 0.75, "sparse_block_shape": (1, 4)}
    fit([str(workdir / "shards")], "emb", workdir / "masks.pt", "norm", config, quiet=True)
    args = ([str(workdir / "shards")], workdir / "sparse", "emb")
    print(preprocess(*args, state=str(workdir / "masks.pt"), out_format="coo"))
    print(preprocess(*args, state=str(workdir / "masks.pt"), out_format="coo"))  # resumes: no work
    emb = read_sparse(workdir / "sparse" / "train-00000.parquet")["emb"]
    kept = emb.ne(0).any(dim=0).nonzero().flatten().tolist()
    print(f"{tuple(emb.shape)} rows, features kept by the fitted mask: {kept}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
