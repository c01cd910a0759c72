"""torchvision's ResNet-18 with a planted harmful task, checked against real retraining.

The callback attaches, unchanged and with its default settings, to a LightningModule around
``torchvision.models.resnet18``. No download: W0 stands in for pretrained weights and is made here.

Setup (everything synthetic, seeded):

- **Images**: 3 x 16 x 16, unit Gaussian noise plus a grating (a sine along rows or columns, random
  phase) in one colour channel.
- **W0**: ResNet-18 (random init) trained for ``pretrain_steps`` on a pretext task, the grating's
  orientation x frequency band (below or above 3.75 cycles; any channel: 4 classes); then a fresh
  2-class head. Like an ImageNet backbone, it has seen the kind of feature the fine-tuning needs,
  but not the fine-tuning task.
- **Fine-tuning tasks**: K = 4 tasks of ``n_per_task`` images with the grating in channel 0, label =
  its orientation; task k's gratings have frequency ``FREQUENCIES[k]``. Task 3 is the planted
  harmful task: its labels are flipped (or scrambled, ``planted``).
- **Target**: held-out images of all four frequencies with their true labels (the validation loader).

What the recipe does:

1. **Attribution run** (Lightning): fine-tune W0 on all tasks with :class:`TaskAttribution` at its
   defaults. Its report ranks the tasks for the target.
2. **GradEx on every subset** (engine): from the callback's saved harvest, F^(s) for all 2^4 - 1
   subsets, with the callback's own estimator.
3. **Real retraining** (:func:`lightning_ksm.retrain.retrain_subsets`): fine-tune a fresh W0 on every
   subset, the same trainer and data, with ``n_seeds`` batch-order seeds.
4. **Scores**: the planted task's rank in the report and in real retraining (each task's effect:
   its least-squares coefficient in the real F over all 15 subsets), the Spearman correlation of F^ and the real F over the 15
   subsets and within subset size, the trivial baseline ``F^ = -|s|``, and the noise ceiling (real F
   of one seed against another). Nothing is tuned: the defaults are what the callback uses.

``python -m recipes.resnet18_planted --quick`` runs step 1 only (about 30 s; the test's mode); the
full run writes ``benchmarks/results/resnet18_planted.json`` (``docs/results.md`` section 6; the
shared steps are ``recipes/_planted.py``). Needs ``torchvision``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `lightning_ksm` and `recipes` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes import _planted  # noqa: E402

N_TASKS, HARMFUL = 4, 3
FREQUENCIES = (2.0, 3.0, 4.0, 5.0)  # grating cycles per image, one per task
SIZE = 16


@dataclass(frozen=True)
class RecipeConfig:
    n_per_task: int = 24
    n_target: int = 128
    amplitude: float = 1.0
    pretrain_steps: int = 200
    pretrain_batch: int = 32
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    n_seeds: int = 3  # real retraining seeds
    projection: str = "auto"  # the callback's projection (its default)
    frozen_norm: bool = False  # BatchNorm in eval mode while fine-tuning (see _planted.classifier)
    planted: str = "flipped"  # task 3's labels: "flipped" or "scrambled" (uniformly random)
    seed: int = 0  # data, W0 and the attribution run


FULL = RecipeConfig()
QUICK = FULL


def gratings(n: int, orientation: torch.Tensor, channel: torch.Tensor, freq: torch.Tensor, amplitude: float,
             generator: torch.Generator) -> torch.Tensor:
    """Noise images with a grating: ``orientation`` 0 = stripes along rows, 1 = along columns."""
    x = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    phase = 2 * torch.pi * torch.rand(n, generator=generator)
    coord = torch.arange(SIZE, dtype=torch.float32) / SIZE
    wave = torch.sin(2 * torch.pi * freq[:, None] * coord[None] + phase[:, None])  # (n, SIZE)
    pattern = torch.where(orientation[:, None, None].bool(), wave[:, None, :], wave[:, :, None])  # (n, S, S)
    x[torch.arange(n), channel] += amplitude * pattern.expand(n, SIZE, SIZE)
    return x


def task_data(cfg: RecipeConfig):
    """``(train, target)`` TensorDatasets of ``(image, label, task)``; task 3's labels are wrong."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1_000 + cfg.seed)
    tasks = torch.arange(N_TASKS).repeat_interleave(cfg.n_per_task)
    n = len(tasks)
    orientation = torch.randint(0, 2, (n,), generator=g)
    freq = torch.tensor(FREQUENCIES)[tasks]
    x = gratings(n, orientation, torch.zeros(n, dtype=torch.long), freq, cfg.amplitude, g)
    y = _planted.plant(orientation, tasks, HARMFUL, cfg.planted, g)
    m = cfg.n_target
    t_orient = torch.randint(0, 2, (m,), generator=g)
    t_freq = torch.tensor(FREQUENCIES)[torch.arange(m) % N_TASKS]
    tx = gratings(m, t_orient, torch.zeros(m, dtype=torch.long), t_freq, cfg.amplitude, g)
    return TensorDataset(x, y, tasks), TensorDataset(tx, t_orient, torch.zeros(m, dtype=torch.long))


def make_w0(cfg: RecipeConfig) -> dict:
    """ResNet-18 trained on the pretext task (orientation x frequency band), with a fresh 2-class head."""
    import torchvision

    torch.manual_seed(cfg.seed)
    net = torchvision.models.resnet18(num_classes=4)
    g = torch.Generator().manual_seed(2_000 + cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(cfg.pretrain_steps):
        b = cfg.pretrain_batch
        orientation, channel = torch.randint(0, 2, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)
        freq = 1.5 + 4.5 * torch.rand(b, generator=g)
        x = gratings(b, orientation, channel, freq, cfg.amplitude, g)
        loss = nn.functional.cross_entropy(net(x), orientation * 2 + (freq > 3.75).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.fc = nn.Linear(net.fc.in_features, 2)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def new_model(w0: dict) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet18(num_classes=2)
    net.load_state_dict(w0)
    return net


def logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return net(images)


def run(cfg: RecipeConfig, out_dir: str, *, retrain: bool = True, log=print) -> dict:
    """One configuration: the attribution run, then (``retrain``) the brute-force check."""
    return _planted.run(sys.modules[__name__], cfg, out_dir, retrain=retrain, log=log)


def main(argv=None) -> dict:
    import torchvision as lib

    return _planted.main(sys.modules[__name__], argv, versions={lib.__name__: lib.__version__})


if __name__ == "__main__":
    main()
