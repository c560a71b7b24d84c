"""Sparsify DataLoader batches in a collate hook; workers share the main process's mask.

Run: python examples/collate_hook.py
"""

import torch
from torch.utils.data import DataLoader, default_collate

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyCollate, SparsifyTransform


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    samples = [{"x": torch.randn(16, generator=gen), "label": i % 3} for i in range(64)]

    # A frozen mask over the 16 features, fitted once on a calibration batch.
    transform = SparsifyTransform(
        DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4)), update="frozen"
    )
    transform(default_collate(samples[:32]))  # calibrate in the main process
    print("mask:", transform.sparsifier.get_mask("batch").int().tolist())
    loader = DataLoader(
        samples,
        batch_size=16,
        collate_fn=SparsifyCollate(transform),
        num_workers=2,
        persistent_workers=True,
    )
    for batch in loader:
        kept = (batch["x"] != 0).float().mean().item()
        print(
            f"batch {tuple(batch['x'].shape)}: kept {kept:.2f}, labels {batch['label'][:4].tolist()}"
        )

    # Re-fit in the main process: the running workers use the new mask (shared memory).
    transform.fit(-default_collate(samples[32:])["x"].flip(1))
    dropped = (next(iter(loader))["x"] == 0).all(dim=0).nonzero().flatten().tolist()
    print("dropped features after re-fit:", dropped)
    print("new mask:", transform.sparsifier.get_mask("batch").int().tolist())


if __name__ == "__main__":  # DataLoader workers may start by spawn: keep the guard
    main()
