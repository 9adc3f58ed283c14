"""The smallest real stage for CLI tests: a point-colour field fitted to a coloured head-like cloud.

Not a stub: an MLP with a positional encoding learns colour(x) from points on an ellipsoid whose
colour varies with position; its validation L1 falls as it trains.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def coloured_cloud(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3) points on a head-sized ellipsoid and (n, 3) colours in [0, 1] that vary with position."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    points = d * torch.tensor([0.35, 0.45, 0.4])
    colours = torch.stack([0.5 + 0.5 * torch.sin(4 * points[:, 0]), 0.5 + 0.4 * points[:, 1], (points[:, 2] > 0).float() * 0.6 + 0.2], -1)
    return points, colours.clamp(0, 1)


class PointColourData(pl.LightningDataModule):
    def __init__(self, num_points: int = 512, batch_size: int = 64, expression_dim: int = 0, image_size: int = 32) -> None:
        super().__init__()
        self.num_points, self.batch_size = num_points, batch_size
        self.expression_dim, self.image_size = expression_dim, image_size

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*coloured_cloud(self.num_points, seed=1))
        self.val_set = TensorDataset(*coloured_cloud(self.num_points // 4, seed=2))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader


class PointColourModule(pl.LightningModule):
    stage = "toy"
    monitor = "toy/tracked/val/full/l1"
    monitor_mode = "min"

    def __init__(self, hidden: int = 32, frequencies: int = 4, lr: float = 1e-2, expression_dim: int = 0, image_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("freqs", 2.0 ** torch.arange(frequencies) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * frequencies, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = points[..., None] * self.freqs  # (N, 3, F)
        enc = torch.cat([points, x.sin().flatten(1), x.cos().flatten(1)], -1)
        return torch.sigmoid(self.mlp(enc))

    def training_step(self, batch, batch_idx):
        points, colours = batch
        loss = (self(points) - colours).abs().mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        points, colours = batch
        self.log("toy/tracked/val/full/l1", (self(points) - colours).abs().mean())

    def test_step(self, batch, batch_idx):
        points, colours = batch
        self.log("toy/tracked/test/full/l1", (self(points) - colours).abs().mean())

    def run_metrics(self):
        return {"params/toy": sum(p.numel() for p in self.parameters())}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class AbsurdLearningRate(pl.Callback):
    """Sets every parameter group of the first optimizer to ``lr`` from epoch ``from_epoch`` on: drives a
    healthy fit into divergence (the GAR divergence-guard test)."""

    def __init__(self, from_epoch: int = 1, lr: float = 10.0) -> None:
        self.from_epoch, self.lr = from_epoch, lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.from_epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr
