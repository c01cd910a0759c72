"""The in-memory form of harvested per-sample features, shared by harvest, store and GradEx.

A harvest at the snapshot weights W0 yields, for every sample i:

- ``outputs[i]``: the model output f0(x_i) in the chosen output mode: a scalar (``margin``,
  ``regression``, scalar user callables) or a vector of C logits (``logits``);
- ``jacobians[i]``: the randomly projected Jacobian of that output with respect to the selected
  parameters: shape ``(k,)`` for scalar outputs, ``(C, k)`` for logits;
- ``labels[i]``: the label (class index for ``logits``; 1.0 for ``margin``; a float target for
  ``regression``; a {0, 1} label for binary ``logistic``);
- ``task_ids[i]``: the integer index of the sample's task in ``task_names``;
- optionally (source split) ``readout[i]``: ``(C, T)``, the sample's output moved along each
  target column's loss gradient at W0, exactly (``readout_columns`` names the T columns; see
  :mod:`lightning_ksm.harvesting.readout`); ``preconditioned``: the gradients were scaled by the
  watched optimizer's second moments before the projection; ``projection_draws``: the Jacobians
  hold that many independent projections side by side (:meth:`HarvestedFeatures.draw`).

Arrays are numpy (possibly memory-mapped from the on-disk store); GradEx moves them to torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .config import OUTPUT_MODES as _HARVEST_OUTPUTS

__all__ = ["HarvestedFeatures", "OUTPUT_MODES"]

OUTPUT_MODES = _HARVEST_OUTPUTS + ("custom",)  # "custom": a callable output


@dataclass
class HarvestedFeatures:
    """Per-sample outputs f0, projected Jacobians J, labels and task ids of one split."""

    outputs: np.ndarray
    jacobians: np.ndarray
    labels: np.ndarray
    task_ids: np.ndarray
    task_names: list = field(default_factory=list)
    mode: str = "margin"
    readout: np.ndarray | None = None
    readout_columns: list = field(default_factory=list)
    preconditioned: bool = False
    projection_draws: int = 1

    def __post_init__(self) -> None:
        n = len(self.task_ids)
        if self.readout is not None and (len(self.readout) != n or self.readout.ndim != 3
                                         or self.readout.shape[2] != len(self.readout_columns)):
            raise ValueError(
                f"HarvestedFeatures.readout must have shape (n, C, T) with n = {n} and T = "
                f"len(readout_columns) = {len(self.readout_columns)}, got {self.readout.shape}"
            )
        for name in ("outputs", "jacobians", "labels"):
            arr = getattr(self, name)
            if len(arr) != n:
                raise ValueError(
                    f"HarvestedFeatures.{name} has {len(arr)} rows but task_ids has {n}; "
                    "every per-sample array must have one row per sample"
                )
        scalar = self.outputs.ndim == 1
        if scalar and self.jacobians.ndim != 2:
            raise ValueError(
                f"scalar outputs need jacobians of shape (n, k), got {self.jacobians.shape}"
            )
        if not scalar and (self.jacobians.ndim != 3 or self.jacobians.shape[1] != self.outputs.shape[1]):
            raise ValueError(
                f"outputs of shape {self.outputs.shape} need jacobians of shape (n, C, k), "
                f"got {self.jacobians.shape}"
            )
        if self.mode not in OUTPUT_MODES:
            raise ValueError(f"mode must be one of {OUTPUT_MODES}, got {self.mode!r}")

    @property
    def n_samples(self) -> int:
        return len(self.task_ids)

    @property
    def proj_dim(self) -> int:
        return int(self.jacobians.shape[-1])

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def subset(self, index: np.ndarray | Sequence[int]) -> "HarvestedFeatures":
        """The rows in ``index`` (a boolean mask or integer positions), same task names."""
        index = np.asarray(index)
        return HarvestedFeatures(
            outputs=np.asarray(self.outputs[index]),
            jacobians=np.asarray(self.jacobians[index]),
            labels=np.asarray(self.labels[index]),
            task_ids=np.asarray(self.task_ids[index]),
            task_names=list(self.task_names),
            mode=self.mode,
            readout=None if self.readout is None else np.asarray(self.readout[index]),
            readout_columns=list(self.readout_columns),
            preconditioned=self.preconditioned,
            projection_draws=self.projection_draws,
        )

    def draw(self, i: int) -> "HarvestedFeatures":
        """The features of projection draw ``i`` alone (``projection_draws`` blocks of columns)."""
        k = self.proj_dim // self.projection_draws
        return dataclasses.replace(self, jacobians=self.jacobians[..., i * k:(i + 1) * k], projection_draws=1)
