"""Sparsify batches in a torchdata.nodes pipeline and resume mid-epoch with the same masks.

Run: python examples/torchdata_nodes.py
"""

import torch
from torchdata.nodes import Batcher, IterableWrapper, Loader, Mapper

from pipesparse import DataNormSparsifier
from pipesparse.transforms import SparsifyNode, SparsifyTransform


def stack(items):
    return {"x": torch.stack([i["x"] for i in items]), "id": [i["id"] for i in items]}


def pipeline() -> Loader:
    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(8, generator=gen), "id": f"row{i}"} for i in range(40)]
    batches = Mapper(Batcher(IterableWrapper(rows), batch_size=4), stack)
    # Mask over the 8 features, refitted every 3 batches.
    transform = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update=3)
    return Loader(SparsifyNode(batches, transform))


def main() -> None:
    uninterrupted = list(pipeline())

    loader = pipeline()
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()  # source position + masks + the update=3 counter
    print("saved after 4 batches; node state keys:", sorted(state["root"]))

    resumed = pipeline()  # e.g. after a restart: a new pipeline, a new transform
    resumed.load_state_dict(state)
    batches = head + list(resumed)
    same = all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, uninterrupted, strict=True))
    print(f"{len(batches)} batches, identical to an uninterrupted run: {same}")
    print(
        "first batch ids:", batches[0]["id"], "zeros:", (batches[0]["x"] == 0).float().mean().item()
    )


if __name__ == "__main__":
    main()
