"""Lightning callbacks: sparsify a copy of the model after training, or after every epoch.

Run: python examples/lightning_callbacks.py   (needs: pip install 'pipesparse[lightning]')
"""

import logging
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipesparse import CubicSparsityScheduler, DataNormSparsifier
from pipesparse.lightning import PostTrainingDataSparsity, TrainingAwareDataSparsity

logging.getLogger("lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def weights_only(name: str, parameter: nn.Parameter) -> bool:
    return parameter.dim() == 2  # leave the biases dense


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    loader = DataLoader(TensorDataset(x, x[:, :1] * 2), batch_size=32)
    post = PostTrainingDataSparsity(DataNormSparsifier, {"sparsity_level": 0.5}, weights_only)
    aware = TrainingAwareDataSparsity(
        DataNormSparsifier,
        {"sparse_block_shape": (1, 4)},
        CubicSparsityScheduler,
        {"init_level": 0.0, "final_level": 0.8, "total_steps": 3},
        weights_only,
    )
    module = Regressor()
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[aware, post],
    )
    trainer.fit(module, loader)
    dense = (module.model[0].weight == 0).float().mean().item()
    print(f"trained model zeros: {dense:.2f} (never modified)")
    print("post-training copy:", {k: round(v, 2) for k, v in post.sparsity_levels.items()})
    print("training-aware copy:", {k: round(v, 2) for k, v in aware.sparsity_levels.items()})
    with torch.no_grad():
        for name, net in (
            ("dense", module.model),
            ("post", post.sparsified),
            ("aware", aware.sparsified),
        ):
            print(f"{name:5s} loss {nn.functional.mse_loss(net(x), x[:, :1] * 2).item():.4f}")


if __name__ == "__main__":
    main()
