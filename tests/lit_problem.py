"""A tiny multi-task classification problem and LightningModule for the callback tests.

Module-level (picklable) so that ``strategy="ddp_spawn"`` can ship it to worker processes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning.pytorch as L

D = 6
N_TASKS = 4


def make_data(n_per_task: int = 60, n_val: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N_TASKS, D, generator=g)
    W[1] = W[0] + 0.2 * torch.randn(D, generator=g)

    def split(n):
        X = torch.randn(N_TASKS * n, D, generator=g)
        t = torch.arange(N_TASKS).repeat_interleave(n)
        y = ((X * W[t]).sum(1) > 0).long()
        return X, y, t

    X, y, t = split(n_per_task)
    y[t == 3] = torch.randint(0, 2, (int((t == 3).sum()),), generator=g)  # task 3: label noise
    return TensorDataset(X, y, t), TensorDataset(*split(n_val))


class TinyNet(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 16):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SimulatedKill(RuntimeError):
    """Stands for the process being killed."""


class Crashing(Dataset):
    """Wraps a dataset and raises once ``armed`` and index ``at`` is read (a killed harvest)."""

    def __init__(self, base, at: int):
        self.base, self.at, self.armed = base, at, False

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.armed and i == self.at:
            raise SimulatedKill(f"simulated kill while reading sample {i}")
        return self.base[i]


def loaders(train, val, batch_size: int = 32):
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(val, batch_size=batch_size),
    )
