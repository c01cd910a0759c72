"""A planted multi-task classification problem whose task effects are known by construction.

Used by the tests, ``python -m lightning_ksm.demo`` and ``docs/quickstart.md``. Inputs ``x`` are
in R^8 with standard normal coordinates; some coordinates are held at 0 in some tasks' data (the
task was "collected where that feature does not vary"). The **target** task is
``y = [x0 + x1 > 0]``, with ``x3 = x4 = 0``; it appears only in the validation data. The six
source (training) tasks, each with 10% flipped labels unless said otherwise:

===========  ================================================  =====================================
task         data                                              planted effect on the target
===========  ================================================  =====================================
helper       the target's rule; x2 held at 0                   helps on its own
noisy        random labels, 90% of them class 1 (no flips);    hurts: teaches a wrong class prior
             x2 held at 0                                      and fits noise
pair-a       ``y = [x0 + 1.5 x2 > 0]``                         each alone hurts or helps little: it
pair-b       pair-a's samples mirrored (x0 <-> x1,             teaches the nuisance feature x2,
             x2 -> -x2), so ``y = [x1 - 1.5 x2 > 0]``          which the target varies but does not
                                                               use. Together the two x2 pulls cancel
                                                               and they teach x0 + x1: they help
                                                               jointly (synergy)
neutral-1    ``y = [x3 > 0]``; x0, x1, x2 held at 0            about none (the target has x3 = 0)
neutral-2    ``y = [x4 > 0]``; x0, x1, x2 held at 0            about none (the target has x4 = 0)
===========  ================================================  =====================================

The model is a small MLP ``8 -> 32 (tanh) -> 2``. Its hidden layer is pretrained briefly without
labels (an autoencoder of ``x``) and its classification head starts at zero, so W0 (the weights at
the start of fine-tuning, where GradEx linearizes) predicts 50/50 everywhere: the target loss at W0
is exactly ``log 2``.

:func:`train_on_tasks` and :func:`ground_truth` really fine-tune that model from W0 on task subsets;
that is how the planted structure is verified (``tests/test_planted_callback.py``).

The ``LightningModule`` classes are created on first access, so importing this module does not
import Lightning: ``PlantedClassifier`` subclasses ``lightning.pytorch.LightningModule`` and
``PlantedClassifierPL`` subclasses ``pytorch_lightning.LightningModule``; :func:`planted_module`
builds one of them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "TASKS",
    "TARGET",
    "SYNERGY_PAIR",
    "ROLES",
    "TaskDataset",
    "PlantedProblem",
    "make_planted_problem",
    "pretrained_net",
    "planted_module",
    "train_on_tasks",
    "target_loss",
    "ground_truth",
    "GroundTruth",
]

TASKS = ("helper", "noisy", "pair-a", "pair-b", "neutral-1", "neutral-2")
TARGET = "target"
SYNERGY_PAIR = ("pair-a", "pair-b")
ROLES = {
    "helper": "the target's own rule: helps on its own",
    "noisy": "random labels, 90% class 1: hurts",
    "pair-a": "x0 plus a nuisance feature: helps only together with pair-b",
    "pair-b": "x1 minus the same nuisance feature: helps only together with pair-a",
    "neutral-1": "a feature the target never varies: about no effect",
    "neutral-2": "another feature the target never varies: about no effect",
}


class TaskDataset(Dataset):
    """``(x, y, task_name)`` samples: inputs ``(n, d)`` float, labels ``(n,)`` long, task names.

    The default collate function turns a batch into ``(x_batch, y_batch, [names])``, so the task id
    sits at tuple position 2 (the callback's default ``task_key``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, task_index: torch.Tensor, names: Sequence[str]):
        if not (len(x) == len(y) == len(task_index)):
            raise ValueError(f"x, y and task_index need the same length, got {len(x)}, {len(y)}, {len(task_index)}")
        self.x, self.y, self.task_index, self.names = x, y, task_index, list(names)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.names[int(self.task_index[i])]

    def tasks(self, names: Iterable[str]) -> "TaskDataset":
        """The samples of the given tasks only (in the original order)."""
        names = list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this dataset has {self.names}")
        keep = torch.zeros(len(self.names), dtype=torch.bool)
        keep[[self.names.index(n) for n in names]] = True
        mask = keep[self.task_index]
        return TaskDataset(self.x[mask], self.y[mask], self.task_index[mask], self.names)


@dataclass
class PlantedProblem:
    """The data of the planted problem (see the module docstring).

    ``train``: the source tasks' training samples. ``val``: validation samples of every source task
    and of the target (task name :data:`TARGET`). ``target``: the target's samples only (taken from
    ``val``). ``settings``: the arguments it was made with.
    """

    train: TaskDataset
    val: TaskDataset
    target: TaskDataset
    dim: int
    task_names: tuple = TASKS
    target_name: str = TARGET
    settings: dict = field(default_factory=dict)

    def train_loader(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        """Shuffled training loader (a seeded generator: same seed, same batches)."""
        return DataLoader(self.train, batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    def val_loader(self, batch_size: int = 256) -> DataLoader:
        """Validation loader over every source task and the target."""
        return DataLoader(self.val, batch_size=batch_size)


def _rule(task: str, x: torch.Tensor, nuisance: float) -> torch.Tensor:
    # pair-b's labels come from mirroring pair-a's samples (see make_planted_problem).
    if task in ("helper", TARGET):
        return x[:, 0] + x[:, 1] > 0
    if task == "pair-a":
        return x[:, 0] + nuisance * x[:, 2] > 0
    if task == "neutral-1":
        return x[:, 3] > 0
    if task == "neutral-2":
        return x[:, 4] > 0
    raise ValueError(task)


def make_planted_problem(
    n_per_task: int = 200,
    n_val_per_task: int = 100,
    n_target: int = 400,
    *,
    dim: int = 8,
    label_noise: float = 0.1,
    nuisance_weight: float = 1.5,
    noisy_positive_rate: float = 0.9,
    seed: int = 0,
) -> PlantedProblem:
    """Build the planted problem (all samples drawn from one seeded generator).

    Args:
        n_per_task: training samples per source task (equal sizes, so that sample-uniform training
            weighs every task the same, as GradEx's default ``weighting="task"`` does).
        n_val_per_task: validation samples per source task.
        n_target: validation samples of the target task.
        dim: input dimension (>= 5; coordinates 5.. are distractors).
        label_noise: fraction of flipped labels in every source task but ``noisy``.
        nuisance_weight: weight of the nuisance feature x2 in pair-a's (and, mirrored, pair-b's)
            rule; larger makes each pair task alone more harmful and the pair's synergy stronger.
        noisy_positive_rate: share of class 1 among the noisy task's random labels.
        seed: data seed.
    """
    for name, value in (("n_per_task", n_per_task), ("n_val_per_task", n_val_per_task), ("n_target", n_target)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 5:
        raise ValueError(f"dim must be an int >= 5 (features x0..x4 are used), got {dim!r}")
    if not 0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise!r}")
    if not 0 <= nuisance_weight:
        raise ValueError(f"nuisance_weight must be >= 0, got {nuisance_weight!r}")
    if not 0 <= noisy_positive_rate <= 1:
        raise ValueError(f"noisy_positive_rate must be in [0, 1], got {noisy_positive_rate!r}")
    g = torch.Generator().manual_seed(seed)

    def task_samples(task: str, n: int):
        x = torch.randn(n, dim, generator=g)
        if task in ("helper", "noisy"):
            x[:, 2] = 0.0
        elif task.startswith("neutral"):
            x[:, :3] = 0.0
        elif task == TARGET:
            x[:, 3:5] = 0.0
        if task == "noisy":
            return x, (torch.rand(n, generator=g) < noisy_positive_rate).long()
        y = _rule(task, x, nuisance_weight).long()
        if task != TARGET and label_noise > 0:
            flip = torch.rand(n, generator=g) < label_noise
            y = torch.where(flip, 1 - y, y)
        return x, y

    def split(n_task: int, with_target: bool) -> TaskDataset:
        names = list(TASKS) + ([TARGET] if with_target else [])
        xs, ys, ts = [], [], []
        for i, task in enumerate(names):
            if task == "pair-b":
                # pair-a's samples mirrored (x0 <-> x1, x2 -> -x2), labels kept: the two tasks pull
                # on the nuisance feature x2 exactly oppositely.
                xa, y = xs[names.index("pair-a")], ys[names.index("pair-a")]
                x = xa.clone()
                x[:, 0], x[:, 1], x[:, 2] = xa[:, 1], xa[:, 0], -xa[:, 2]
            else:
                x, y = task_samples(task, n_target if task == TARGET else n_task)
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((len(x),), i, dtype=torch.long))
        return TaskDataset(torch.cat(xs), torch.cat(ys), torch.cat(ts), names)

    train = split(n_per_task, with_target=False)
    val = split(n_val_per_task, with_target=True)
    settings = dict(n_per_task=n_per_task, n_val_per_task=n_val_per_task, n_target=n_target, dim=dim,
                    label_noise=label_noise, nuisance_weight=nuisance_weight,
                    noisy_positive_rate=noisy_positive_rate, seed=seed)
    return PlantedProblem(train=train, val=val, target=val.tasks([TARGET]), dim=dim, settings=settings)


@contextlib.contextmanager
def _one_thread():
    # The model is tiny: with several intra-op threads each step costs more in synchronisation than
    # in arithmetic (10x slower on a loaded 2-core machine), so these helpers run single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrained_net(dim: int = 8, hidden: int = 32, *, seed: int = 0, pretrain_steps: int = 200) -> nn.Sequential:
    """The W0 network: ``Linear(dim, hidden) -> Tanh -> Linear(hidden, 2)``.

    The hidden layer is pretrained without labels (an autoencoder reconstructing standard normal
    inputs, ``pretrain_steps`` Adam steps), and the head is set to zero: at W0 every prediction is
    50/50 and the fine-tuning that follows starts from useful features, as in the paper's setting
    (GradEx linearizes around a pretrained model).
    """
    if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be an int >= 0, got {pretrain_steps!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        decoder = nn.Linear(hidden, dim)
    opt = torch.optim.Adam(list(net[0].parameters()) + list(decoder.parameters()), lr=1e-2)
    with _one_thread():
        for _ in range(pretrain_steps):
            x = torch.randn(256, dim, generator=gen)
            loss = ((decoder(torch.tanh(net[0](x))) - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.zero_()
    return net


# ---------------------------------------------------------------------------------------------
# LightningModules (created lazily: importing this module must not import Lightning).


def _module_class(namespace: str):
    if namespace == "lightning":
        from lightning.pytorch import LightningModule
        name = "PlantedClassifier"
    elif namespace == "pytorch_lightning":
        from pytorch_lightning import LightningModule
        name = "PlantedClassifierPL"
    else:
        raise ValueError(f"namespace must be 'lightning' or 'pytorch_lightning', got {namespace!r}")

    class _Planted(LightningModule):
        """Fine-tunes the planted network on ``(x, y, task_name)`` batches (Adam, cross-entropy).

        Logs ``train_loss``, and per validation epoch ``val_loss`` (all validation samples) and
        ``val_target_loss`` (the target's samples only).
        """

        def __init__(self, dim: int = 8, hidden: int = 32, lr: float = 1e-2, seed: int = 0,
                     pretrain_steps: int = 200):
            super().__init__()
            self.save_hyperparameters()
            self.net = pretrained_net(dim, hidden, seed=seed, pretrain_steps=pretrain_steps)
            self.lr = lr

        def forward(self, x):
            """Logits ``(n, 2)``."""
            return self.net(x)

        def training_step(self, batch, batch_idx):
            """Cross-entropy on a ``(x, y, task_names)`` batch."""
            x, y, _ = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, batch_size=len(y))
            return loss

        def validation_step(self, batch, batch_idx):
            """Logs ``val_loss`` and, for the target's samples, ``val_target_loss``."""
            x, y, tasks = batch
            losses = nn.functional.cross_entropy(self(x), y, reduction="none")
            is_target = torch.tensor([t == TARGET for t in tasks], device=losses.device)
            self.log("val_loss", losses.mean(), batch_size=len(y))
            if is_target.any():
                self.log("val_target_loss", losses[is_target].mean(), batch_size=int(is_target.sum()))

        def configure_optimizers(self):
            """Adam with the module's learning rate."""
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    _Planted.__name__ = _Planted.__qualname__ = name
    _Planted.__module__ = __name__
    return _Planted


_CLASSES: dict = {}


def __getattr__(name):
    # Module-level names, so that the classes pickle (e.g. for strategy="ddp_spawn").
    if name in ("PlantedClassifier", "PlantedClassifierPL"):
        namespace = "lightning" if name == "PlantedClassifier" else "pytorch_lightning"
        if namespace not in _CLASSES:
            _CLASSES[namespace] = _module_class(namespace)
        return _CLASSES[namespace]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def planted_module(problem: Optional[PlantedProblem] = None, *, namespace: str = "lightning",
                   lr: float = 1e-2, hidden: int = 32, seed: int = 0):
    """A fresh LightningModule for the planted problem, at W0 (see :func:`pretrained_net`).

    ``namespace``: ``"lightning"`` (``lightning.pytorch``, use with ``lightning_ksm.TaskAttribution``)
    or ``"pytorch_lightning"`` (use with ``lightning_ksm.pl.TaskAttribution``).
    """
    if namespace not in ("lightning", "pytorch_lightning"):
        raise ValueError(f"namespace must be 'lightning' or 'pytorch_lightning', got {namespace!r}")
    cls = __getattr__("PlantedClassifier" if namespace == "lightning" else "PlantedClassifierPL")
    dim = problem.dim if problem is not None else 8
    return cls(dim=dim, hidden=hidden, lr=lr, seed=seed)


# ---------------------------------------------------------------------------------------------
# Ground truth: real fine-tuning from W0 on task subsets.


def target_loss(net: nn.Module, problem: PlantedProblem) -> float:
    """Mean cross-entropy of ``net`` on the target's samples."""
    with torch.no_grad():
        return float(nn.functional.cross_entropy(net(problem.target.x), problem.target.y))


def train_on_tasks(problem: PlantedProblem, tasks: Iterable[str], *, epochs: int = 10, lr: float = 1e-2,
                   batch_size: int = 64, hidden: int = 32, seed: int = 0) -> nn.Module:
    """Fine-tune a fresh W0 network on the training samples of ``tasks`` only.

    The same recipe as :class:`PlantedClassifier` under ``Trainer(max_epochs=epochs)`` (Adam,
    cross-entropy, shuffled mini-batches), as a plain loop: fast enough to retrain many subsets.
    An empty ``tasks`` returns W0 itself.
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in problem.task_names]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the source tasks are {list(problem.task_names)}")
    net = pretrained_net(problem.dim, hidden, seed=seed)
    if not tasks:
        return net
    data = problem.train.tasks(tasks)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=gen)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(net(data.x[idx]), data.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net


@dataclass
class GroundTruth:
    """Target losses of real fine-tuning on the full set, without each task and without each pair.

    ``loo[task] = loss(all but task) - loss(all)`` (> 0: the task helps, the report's sign);
    ``interactions[(a, b)] = loss(all) - loss(all but a) - loss(all but b) + loss(all but a, b)``
    (< 0: synergy), the quantity the report's interaction matrix estimates.
    ``alone[task]`` and ``pair_alone`` are losses of training on one task / on the pair only;
    ``w0`` is the loss before any training (log 2).
    """

    full: float
    w0: float
    without: dict
    without_pair: dict
    alone: dict
    pair_alone: float

    @property
    def loo(self) -> dict:
        """Leave-one-out effect per task (> 0: removing it raises the target loss: it helps)."""
        return {t: v - self.full for t, v in self.without.items()}

    @property
    def interactions(self) -> dict:
        """Pair interaction per computed pair (< 0: synergy, > 0: antagonism / redundancy)."""
        return {
            (a, b): self.full - self.without[a] - self.without[b] + v
            for (a, b), v in self.without_pair.items()
        }


def ground_truth(problem: PlantedProblem, *, pairs: Optional[Sequence[tuple]] = None, with_alone: bool = True,
                 epochs: int = 10, lr: float = 1e-2, seed: int = 0) -> GroundTruth:
    """Really fine-tune (:func:`train_on_tasks`) on the full set, without each task, without each
    pair in ``pairs`` (default: every pair) and, with ``with_alone``, on each task alone and on
    :data:`SYNERGY_PAIR` alone; return the target losses."""
    tasks = list(problem.task_names)
    pairs = list(combinations(tasks, 2)) if pairs is None else [tuple(p) for p in pairs]
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or any(t not in tasks for t in pair):
            raise ValueError(f"pairs must hold pairs of two different source tasks {tasks}, got {pair!r}")

    def loss(subset):
        return target_loss(train_on_tasks(problem, subset, epochs=epochs, lr=lr, seed=seed), problem)

    full = loss(tasks)
    without = {t: loss([u for u in tasks if u != t]) for t in tasks}
    without_pair = {(a, b): loss([u for u in tasks if u not in (a, b)]) for a, b in pairs}
    alone = {t: loss([t]) for t in tasks} if with_alone else {}
    pair_alone = loss(list(SYNERGY_PAIR)) if with_alone else math.nan
    return GroundTruth(full=full, w0=loss([]), without=without, without_pair=without_pair, alone=alone,
                       pair_alone=pair_alone)
