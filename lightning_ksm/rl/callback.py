"""``RLTaskAttribution``: the Lightning callback that attributes a SAC run to its tasks.

It shares the lifecycle of :class:`lightning_ksm.TaskAttribution`
(:class:`~lightning_ksm.callbacks.base.AttributionCallbackBase`: output directory, W0 file written
atomically by rank 0, resume state, analysis at ``on_fit_end`` that never loses the run), but its
data are environments and a replay buffer rather than dataloaders, so the harvest and F^ come from
the RL adapter (:func:`lightning_ksm.rl.attribute_policy`):

1. after ``snapshot_at`` training iterations: ``W0 = module.snapshot()`` (weights, optimizer states,
   replay buffer), saved as ``<dirpath>/w0.pt``; training goes on untouched;
2. ``on_fit_end``: a copy of the module restored from W0 is attributed (projected policy gradients
   on the W0 replay buffer, GradEx per subset toward the actions of the final policy, which is
   where the run itself moved each state's action; rollouts, kernel surrogate, readouts); the
   :class:`~lightning_ksm.AttributionReport` goes to ``<dirpath>/report`` and its
   ``summary_metrics()`` to every logger. A failure warns (or raises with
   ``raise_on_analysis_error``) and never loses the trained module or the saved W0.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.rank_zero import rank_zero_warn

from ..callbacks.base import AttributionCallbackBase
from ..fileio import torch_load_safe
from .attribution import attribute_policy
from .config import RLAttributionConfig

__all__ = ["RLTaskAttribution"]


class RLTaskAttribution(AttributionCallbackBase, Callback):
    """Task attribution for :class:`~lightning_ksm.rl.SACModule` runs.

    Args:
        snapshot_at: take W0 after this many training iterations (>= 1: the replay buffer must hold
            transitions of every source task, so take it after the warm-up).
        config: :class:`~lightning_ksm.rl.RLAttributionConfig` or a dict of its fields.
        source_tasks, target_tasks: task names (default: all of the module's tasks).
        dirpath: output directory (default ``<logger log dir>/ksm`` or ``<default_root_dir>/ksm``).
        raise_on_analysis_error: re-raise an attribution failure instead of warning.

    After ``fit``: ``callback.report`` (the report), ``callback.report_dir``, ``callback.w0``.
    """

    _name = "RLTaskAttribution"

    def __init__(
        self,
        *,
        snapshot_at: int,
        config: RLAttributionConfig | dict | None = None,
        source_tasks: Optional[Sequence[str]] = None,
        target_tasks: Optional[Sequence[str]] = None,
        dirpath: Optional[str] = None,
        raise_on_analysis_error: bool = False,
    ) -> None:
        super().__init__(dirpath=dirpath, raise_on_analysis_error=raise_on_analysis_error)
        if isinstance(snapshot_at, bool) or not isinstance(snapshot_at, int) or snapshot_at < 1:
            raise ValueError(f"snapshot_at must be an integer >= 1 (training iterations), got {snapshot_at!r}")
        self.snapshot_at = snapshot_at
        self.config = RLAttributionConfig.coerce(config, name="config")
        n_sources = len(list(source_tasks)) if source_tasks is not None else None
        self.config._check_fields()  # every setting now; those bounded by K once the tasks are known
        if n_sources is not None:
            self.config.validate(n_sources)
        self.source_tasks, self.target_tasks = source_tasks, target_tasks
        self.w0: Optional[dict] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "snapshot") or not hasattr(pl_module, "buffer"):
            raise TypeError(f"RLTaskAttribution needs a SACModule, got {type(pl_module).__name__}")
        tasks = list(pl_module.task_names)
        for what, names in (("source_tasks", self.source_tasks), ("target_tasks", self.target_tasks)):
            if names is not None:
                if not list(names):
                    raise ValueError(f"{what} is empty: the task subset has no environments")
                unknown = [n for n in names if n not in tasks]
                if unknown:
                    raise ValueError(f"{what} {unknown} are not among the module's tasks {tasks}")
        self.config.validate(len(tasks) if self.source_tasks is None else len(list(self.source_tasks)))
        self._resolve_output(trainer)

    def _maybe_snapshot(self, trainer, pl_module) -> None:
        if self.w0 is not None:
            return
        if self._resumed and self.w0_path is not None and os.path.exists(self.w0_path):
            # A resumed run continues from its own W0, never from a new snapshot of trained weights.
            # Loaded weights-only; the numpy generator states in it are allowed explicitly.
            self.w0 = torch_load_safe(self.w0_path, numpy=True)
        elif pl_module.iterations >= self.snapshot_at:
            self.w0 = pl_module.snapshot()
            self._save_w0(trainer, self.w0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._maybe_snapshot(trainer, pl_module)  # a module that continues past snapshot_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_snapshot(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.w0 is None:
            rank_zero_warn(
                f"RLTaskAttribution: the run ended after {pl_module.iterations} iterations, before "
                f"snapshot_at={self.snapshot_at}; nothing to attribute"
            )
            return

        def compute():
            module0 = type(pl_module).from_snapshot(self.w0, env_factory=pl_module.env_factory)
            module0.to(pl_module.device)
            return attribute_policy(module0, self.config, source_tasks=self.source_tasks,
                                    target_tasks=self.target_tasks, teacher=pl_module)

        self._finish(trainer, compute, rerun_hint=f"W0 is saved in {self.w0_path}.", figures=False)
