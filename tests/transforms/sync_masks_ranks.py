"""Run by test_sharing.py: 2 gloo ranks on 127.0.0.1, masked batches before and after sync.

Usage: python sync_masks_ranks.py PORT OUT_DIR [SCENARIO]. Each rank writes OUT_DIR/rank{r}.pt.
SCENARIO "sync" (default): masked batches before and after; "unfitted_src" (rank 0 has no
mask), "mismatch" (the ranks' transforms differ in mask_over) and "inherited" (every rank got
the transform from the launching process through mp.spawn, so it may not rewrite its masks):
each rank's error message and whether its mask stayed as it was.
"""

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyTransform, sync_masks


def failing(rank: int, scenario: str, out_dir: str, inherited=None) -> None:
    if scenario == "inherited":
        transform = inherited
    elif scenario == "mismatch":
        mask_over = "features" if rank == 0 else "batch"
        transform = SparsifyTransform(DataNormSparsifier(), update="frozen", mask_over=mask_over)
    else:
        transform = SparsifyTransform(DataNormSparsifier(), update="frozen")
    if scenario != "inherited" and (rank == 1 or scenario == "mismatch"):
        transform.fit(torch.randn(4, 16, generator=torch.Generator().manual_seed(rank)))
    before = transform.state_dict()
    try:
        sync_masks(transform, src=0)
        error = None
    except ValueError as err:
        error = str(err)
    after = transform.state_dict()
    kept = before["sparsifier"]["state"].keys() == after["sparsifier"]["state"].keys() and all(
        torch.equal(
            before["sparsifier"]["state"][n]["mask"], after["sparsifier"]["state"][n]["mask"]
        )
        for n in before["sparsifier"]["state"]
    )
    torch.save({"error": error, "kept": kept}, f"{out_dir}/rank{rank}.pt")


def loopback_store(rank: int, port: int) -> dist.TCPStore:
    """The group's TCPStore on 127.0.0.1 only: given a bare address, rank 0's store would
    listen on every interface, so rank 0 binds the socket itself and hands it over."""
    timeout = datetime.timedelta(seconds=60)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return dist.TCPStore(
        "127.0.0.1",
        port,
        2,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here
        timeout=timeout,
    )


def run(rank: int, port: int, out_dir: str, scenario: str = "sync", inherited=None) -> None:
    dist.init_process_group(
        "gloo",
        store=loopback_store(rank, port),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        if scenario != "sync":
            failing(rank, scenario, out_dir, inherited)
            return
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
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    args = [int(sys.argv[1]), *sys.argv[2:4]]
    if args[2:] == ["inherited"]:
        launched = SparsifyTransform(DataNormSparsifier(), update="frozen")
        launched.fit(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)))
        args.append(launched)
    mp.spawn(run, args=tuple(args), nprocs=2, join=True)
