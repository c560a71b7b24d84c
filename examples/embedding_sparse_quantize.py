"""Prune and quantize a model's embeddings after training; pruned entries stay exactly 0.

Run: python examples/embedding_sparse_quantize.py
"""

import copy
import warnings

import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as TorchAONorm
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize as torch_ao_post_training_sparse_quantize,
)

from pipesparse import DataNormSparsifier, post_training_sparse_quantize

warnings.filterwarnings("ignore", category=UserWarning)  # torch's quantization deprecations
warnings.filterwarnings("ignore", category=DeprecationWarning)


class ItemTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(300, 32, mode="mean")  # nested: converted too
        self.proj = nn.Linear(32, 32)  # not an embedding: left as it is

    def forward(self, items, offsets):
        return self.proj(self.bag(items, offsets))


class Recommender(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.users = nn.Embedding(500, 32)
        self.tower = ItemTower()

    def forward(self, user, items, offsets):
        return (self.users(user) * self.tower(items, offsets)).sum(dim=1)


def zeros(module) -> float:
    return (module.weight().dequantize() == 0).float().mean().item()


def main() -> None:
    config = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}
    user, items, offsets = torch.arange(4), torch.arange(12), torch.tensor([0, 3, 6, 9])
    for sparsify_first in (True, False):
        model, reference = Recommender(), Recommender()
        float_model = copy.deepcopy(model)
        post_training_sparse_quantize(model, DataNormSparsifier, sparsify_first, **config)
        torch_ao_post_training_sparse_quantize(reference, TorchAONorm, sparsify_first, **config)
        print(
            f"sparsify_first={sparsify_first}: zeros after quantization "
            f"pipesparse {zeros(model.users):.2f} / torch.ao {zeros(reference.users):.2f}"
        )
        # the float model with the same entries pruned, to see the quantization error alone
        with torch.no_grad():
            float_model.users.weight.mul_(model.users.weight().dequantize() != 0)
            float_model.tower.bag.weight.mul_(model.tower.bag.weight().dequantize() != 0)
        diff = (model(user, items, offsets) - float_model(user, items, offsets)).abs().max()
        kinds = [repr(m).split("(")[0] for m in (model.users, model.tower.bag, model.tower.proj)]
        print(f"  modules now: {', '.join(kinds)}; max output error {diff:.4f}")


if __name__ == "__main__":
    main()
