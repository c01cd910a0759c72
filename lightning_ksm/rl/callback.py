"""``RLTaskAttribution``: the Lightning callback that attributes a SAC run to its tasks.

It follows the lifecycle of :class:`lightning_ksm.TaskAttribution` (snapshot W0 during ``fit``,
analyse at ``on_fit_end``, save the report, log it to every logger) but its data are environments
and a replay buffer rather than dataloaders, so the harvest and F^ come from the RL adapter
(:func:`lightning_ksm.rl.attribute_policy`) instead of :func:`lightning_ksm.run_analysis`:

1. after ``snapshot_at`` training iterations: ``W0 = module.snapshot()`` (weights, optimizer states,
   replay buffer), saved as ``<dirpath>/w0.pt``; training goes on untouched;
2. ``on_fit_end``: a copy of the module restored from W0 is attributed (projected policy gradients
   on the W0 replay buffer, GradEx per subset toward the actions of the final policy, which is
   where the run itself moved each state's action; rollouts, kernel surrogate, readouts); the
   :class:`~lightning_ksm.AttributionReport` goes to ``<dirpath>/report`` and its
   ``summary_metrics()`` to every logger. A failure warns (or raises with ``raise_on_error``) and
   never loses the trained module or the saved W0.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from .attribution import RLAttributionConfig, attribute_policy

__all__ = ["RLTaskAttribution"]


class RLTaskAttribution(Callback):
    """Task attribution for :class:`~lightning_ksm.rl.SACModule` runs.

    Args:
        snapshot_at: take W0 after this many training iterations (>= 1: the replay buffer must hold
            transitions of every source task, so take it after the warm-up).
        config: :class:`~lightning_ksm.rl.RLAttributionConfig` or a dict of its fields.
        source_tasks, target_tasks: task names (default: all of the module's tasks).
        dirpath: output directory (default ``<default_root_dir>/ksm``).
        raise_on_error: re-raise an attribution failure instead of warning.

    After ``fit``: ``callback.report`` (the report), ``callback.report_dir``, ``callback.w0``.
    """

    def __init__(
        self,
        *,
        snapshot_at: int,
        config: RLAttributionConfig | dict | None = None,
        source_tasks: Optional[Sequence[str]] = None,
        target_tasks: Optional[Sequence[str]] = None,
        dirpath: Optional[str] = None,
        raise_on_error: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(snapshot_at, bool) or not isinstance(snapshot_at, int) or snapshot_at < 1:
            raise ValueError(f"snapshot_at must be an integer >= 1 (training iterations), got {snapshot_at!r}")
        self.snapshot_at = snapshot_at
        self.config = RLAttributionConfig.from_dict(config) if isinstance(config, dict) else (config or RLAttributionConfig())
        self.source_tasks, self.target_tasks = source_tasks, target_tasks
        self.dirpath = dirpath
        self.raise_on_error = raise_on_error
        self.w0: Optional[dict] = None
        self.report = None
        self.error: Optional[BaseException] = None

    @property
    def report_dir(self) -> Optional[str]:
        """Where the report is written (known once fit has started)."""
        return None if self.dirpath is None else os.path.join(self.dirpath, "report")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "snapshot") or not hasattr(pl_module, "buffer"):
            raise TypeError(f"RLTaskAttribution needs a SACModule, got {type(pl_module).__name__}")
        # validate names and settings now, not after training
        tasks = list(pl_module.task_names)
        for what, names in (("source_tasks", self.source_tasks), ("target_tasks", self.target_tasks)):
            if names is not None:
                if not list(names):
                    raise ValueError(f"{what} is empty: the task subset has no environments")
                unknown = [n for n in names if n not in tasks]
                if unknown:
                    raise ValueError(f"{what} {unknown} are not among the module's tasks {tasks}")
        self.config.validate(len(tasks) if self.source_tasks is None else len(list(self.source_tasks)))
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "ksm")

    def _maybe_snapshot(self, pl_module) -> None:
        if self.w0 is None and pl_module.iterations >= self.snapshot_at:
            self.w0 = pl_module.snapshot()
            os.makedirs(self.dirpath, exist_ok=True)
            torch.save(self.w0, os.path.join(self.dirpath, "w0.pt"))

    def on_train_start(self, trainer, pl_module) -> None:
        self._maybe_snapshot(pl_module)  # a module that continues past snapshot_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_snapshot(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.w0 is None:
            warnings.warn(
                f"RLTaskAttribution: the run ended after {pl_module.iterations} iterations, before "
                f"snapshot_at={self.snapshot_at}; nothing to attribute", stacklevel=2,
            )
            return
        if not trainer.is_global_zero:
            return
        try:
            module0 = type(pl_module).from_snapshot(self.w0, env_factory=pl_module.env_factory)
            module0.to(pl_module.device)
            report = attribute_policy(module0, self.config, source_tasks=self.source_tasks,
                                      target_tasks=self.target_tasks, teacher=pl_module)
            report.save(self.report_dir, figures=False)
        except Exception as exc:  # the trained module and W0 are kept either way
            self.error = exc
            if self.raise_on_error:
                raise
            warnings.warn(f"RLTaskAttribution: attribution failed ({exc!r}); W0 is saved in {self.dirpath}",
                          stacklevel=2)
            return
        self.report = report
        metrics = report.summary_metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
