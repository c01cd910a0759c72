"""What one retraining run trains on: :class:`LightningTrainFn` and :func:`select_samples`.

Duck-typed: this module never imports Lightning itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["LightningTrainFn", "select_samples"]


@dataclass
class LightningTrainFn:
    """A ``train_fn`` for :func:`retrain_subsets` built from Lightning factories.

    Each call builds a fresh module and trainer, fits on the subset's training loader and returns
    ``evaluate(module)``. All four callables must be picklable for ``n_jobs > 1`` (module-level
    functions or ``functools.partial`` of them).

    Attributes:
        make_module: ``make_module(seed) -> LightningModule`` at the starting weights W0.
        make_trainer: ``make_trainer(seed) -> Trainer`` (e.g. ``max_steps``, ``logger=False``,
            ``enable_checkpointing=False``, ``default_root_dir``).
        make_train_loader: ``make_train_loader(subset, seed) -> DataLoader`` over the samples of
            the selected tasks (see :func:`select_samples`).
        evaluate: ``evaluate(module) -> {target_name: loss}`` after training.
    """

    make_module: Callable
    make_trainer: Callable
    make_train_loader: Callable
    evaluate: Callable
    fit_kwargs: dict = field(default_factory=dict)

    def __call__(self, subset: np.ndarray, seed: int) -> dict:
        module = self.make_module(seed)
        trainer = self.make_trainer(seed)
        trainer.fit(module, train_dataloaders=self.make_train_loader(subset, seed), **self.fit_kwargs)
        module.eval()
        return dict(self.evaluate(module))


def select_samples(task_ids, subset, *, task_names: Optional[Sequence] = None) -> np.ndarray:
    """Positions of the samples whose task is selected by ``subset``: the training set of F(s).

    ``task_ids``: ``(n,)`` task index per sample (ints in ``[0, K)``), or task names when
    ``task_names`` gives the column order. ``subset``: ``(K,)`` 0/1. Returns sorted int64 positions.
    """
    mask = np.asarray(subset)
    if mask.ndim != 1 or mask.size == 0 or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"subset must be a non-empty 1-D 0/1 vector, got {np.asarray(subset)!r}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("subset selects no task; every training subset needs at least one task")
    ids = np.asarray(task_ids)
    if task_names is not None:
        names = list(task_names)
        if len(names) != len(mask):
            raise ValueError(f"subset has {len(mask)} entries but task_names has {len(names)}")
        lookup = {n: i for i, n in enumerate(names)}
        unknown = [t for t in ids.tolist() if t not in lookup]
        if unknown:
            raise ValueError(f"task id {unknown[0]!r} is not in task_names {names[:5]}...")
        ids = np.array([lookup[t] for t in ids.tolist()], dtype=np.int64)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError("task_ids must be a 1-D array of integer task indices (or names with task_names=)")
    bad = np.flatnonzero((ids < 0) | (ids >= len(mask)))
    if len(bad):
        raise ValueError(f"task_ids[{int(bad[0])}] = {ids[bad[0]]} is not a column of the subset (K = {len(mask)})")
    return np.flatnonzero(mask[ids]).astype(np.int64)
