"""Ramp the sparsity of a pipeline's batches over an epoch with a cubic (Zhu & Gupta) schedule.

Run: python examples/sparsity_schedule.py
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

from pipesparse import CubicSparsityScheduler, DataNormSparsifier
from pipesparse.transforms import SparsifyCollate, SparsifyTransform


def main() -> None:
    data = torch.randn(80, 32, generator=torch.Generator().manual_seed(0)) + 3  # no zeros
    sparsifier = DataNormSparsifier(sparse_block_shape=(1, 4))
    transform = SparsifyTransform(sparsifier, update="every_batch")
    # s_t = s_f + (s_i - s_f) * (1 - t / T) ** 3, one step per batch
    scheduler = CubicSparsityScheduler(sparsifier, init_level=0.0, final_level=0.75, total_steps=8)
    # num_workers=0: the batch is built (and masked) in this process, after the last step
    loader = DataLoader(TensorDataset(data), batch_size=8, collate_fn=SparsifyCollate(transform))
    for i, (batch,) in enumerate(loader):
        scheduled = sparsifier.data_groups["batch"]["sparsity_level"]
        measured = (batch == 0).float().mean().item()
        print(f"batch {i}: scheduled {scheduled:.3f}, measured {measured:.3f}")
        scheduler.step()  # after the sparsifier's step, as with LR schedulers

    state = scheduler.state_dict()  # plain values: torch.save / weights_only-loadable
    print("scheduler state:", {k: state[k] for k in ("last_epoch", "_step_count")})


if __name__ == "__main__":
    main()
