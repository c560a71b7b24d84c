"""2:4 structured sparsity of DataLoader batches: keep the 2 largest of every 4 features.

Run: python examples/nm_sparsity.py
"""

import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from pipesparse import NMSparsifier
from pipesparse.transforms import SparsifyCollate, SparsifyTransform


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 16, generator=gen), torch.arange(64))
    # every_batch: each batch gets its own 2:4 mask (the rule runs on the batch itself)
    transform = SparsifyTransform(NMSparsifier(n=2, m=4), keys=[0])
    loader = DataLoader(data, batch_size=16, collate_fn=SparsifyCollate(transform))
    for x, ids in loader:
        kept_per_group = (x != 0).reshape(-1, 4).sum(dim=1)
        print(
            f"batch {ids[0].item():2d}-{ids[-1].item():2d}: kept per group of 4 = "
            f"{sorted(set(kept_per_group.tolist()))}, zeros {(x == 0).float().mean():.2f}"
        )

    # On a CUDA GPU with float16/bfloat16 data the masked batch can come back in the
    # semi-structured layout that sparse tensor cores multiply fast; on CPU it stays dense.
    sparsifier = NMSparsifier(semi_structured=True)
    batch = torch.randn(64, 128, dtype=torch.float16, generator=gen)
    if torch.cuda.is_available():
        batch = batch.cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsifier.add_data("batch", batch)
        sparsifier.step()
        out = sparsifier.get_data("batch", return_original=False)
    print(f"semi_structured on {batch.device.type}: {type(out).__name__}, warnings: {len(caught)}")


if __name__ == "__main__":
    main()
