"""Sparsify a Hugging Face dataset column with Dataset.map; types and the cache are kept.

Run: python examples/hf_map.py
"""

import tempfile

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value, load_from_disk

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, hf_map_fn


def main() -> None:
    rng = np.random.default_rng(0)
    features = Features({"emb": Sequence(Value("float32"), length=16), "label": Value("int64")})
    data = {"emb": rng.standard_normal((256, 16)).astype("float32"), "label": list(range(256))}
    with tempfile.TemporaryDirectory() as tmp:
        Dataset.from_dict(data, features=features).save_to_disk(f"{tmp}/ds")
        ds = load_from_disk(f"{tmp}/ds")  # file-backed, so map results are cached

        # One mask for every row, fitted on a calibration batch, the same in every worker.
        transform = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
        transform(torch.from_numpy(data["emb"][:64]))
        fn = hf_map_fn(transform, "emb")
        out = ds.map(fn, batched=True, batch_size=32, num_proc=2)
        again = ds.map(fn, batched=True, batch_size=32, num_proc=2)  # served from the cache

        emb = np.asarray(out.with_format("numpy")["emb"])
        print("features kept:", out.features == ds.features, out.features["emb"])
        print(
            f"zeros: {(emb == 0).mean():.2f}, dtype {emb.dtype}, labels kept:",
            out["label"] == ds["label"],
        )
        print("same fingerprint on re-run:", out._fingerprint == again._fingerprint)
        print("cache reused:", out.cache_files == again.cache_files)

        # A mask per batch instead, from the batch itself, on the arrow format.
        per_batch = SparsifyTransform(DataNormSparsifier(sparsity_level=0.75))
        arrow = ds.with_format("arrow").map(hf_map_fn(per_batch, "emb"), batched=True)
        print(
            "every_batch on arrow, zeros:",
            f"{(np.asarray(arrow.with_format('numpy')['emb']) == 0).mean():.2f}",
        )


if __name__ == "__main__":
    main()
