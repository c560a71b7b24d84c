"""Run by test_sharing.py: 2 gloo ranks on 127.0.0.1, masked batches before and after sync.

Usage: python sync_masks_ranks.py PORT OUT_DIR. Each rank writes OUT_DIR/rank{r}.pt.
"""

import datetime
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, sync_masks


def run(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        transform = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update=3)
        calibration = torch.randn(32, 16, generator=torch.Generator().manual_seed(100 + rank))
        for _ in range(rank + 1):  # the ranks also differ in their update=3 counter
            transform(calibration)
        batch = {"x": torch.randn(4, 16, generator=torch.Generator().manual_seed(7)), "y": rank}
        before = transform(batch)["x"]
        sync_masks(transform, src=0)
        after = transform(batch)["x"]
        state = transform.state_dict()
        torch.save(
            {"before": before, "after": after, "batches_seen": state["batches_seen"]},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
