"""Settings of the RL attribution: the RL adapter's own settings, declared here, and the harvest and
analysis settings it shares with the supervised pipeline, reused from :mod:`lightning_ksm.config`
(same checks and help; only some defaults differ for RL)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from ..config import AnalysisConfig, HarvestConfig, _Settings, inherit, int_at_least, one_of, positive_number, setting

__all__ = ["RLAttributionConfig"]


def _subset_size(name, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be an integer >= 0 (0: Bernoulli subset_p) or None, got {value!r}")


_subset_size.describe = "integer >= 0 (0: Bernoulli subset_p), or None: round(0.7 K)"


@dataclass
class RLAttributionConfig(_Settings):
    """Settings of the RL attribution (JSON-able; stored in the report).

    Harvest: ``n_per_task`` replay transitions per source task (seeded by ``seed``);
    ``projection`` / ``proj_dim`` / ``proj_seed`` of the actor's gradients; ``targets``: "policy"
    (a later policy's actions; needs a ``teacher`` module), "critic" (one critic-gradient step) or
    "auto" (policy when a teacher is given); ``action_step`` the critic step eta (action units,
    actions lie in [-1, 1]).
    GradEx: ``ridge``: lambda relative to the mean per-sample squared Jacobian norm / k (so it does
    not depend on the projection's scale; the default 1.0 keeps the estimated policies in the
    linear regime, see :meth:`PolicyGradEx.linearization_error`); ``weighting`` "task" or "sample".
    Subsets: ``n_subsets`` random subsets, ``subset_size`` tasks each (default: round(0.7 K), the
    paper's 7 of 10), or Bernoulli ``subset_p`` when ``subset_size`` is 0.
    Rollouts: ``episodes`` per target task, seeded by ``rollout_seed``; ``max_episode_steps``
    (None: the module's).
    Surrogate and readouts: as in :class:`lightning_ksm.AnalysisConfig`; ``top_k`` co-training
    partners per target (the paper uses 3).
    """

    _what = "RL attribution setting"

    n_per_task: int = setting(256, "replay transitions per source task", int_at_least(1))
    targets: str = setting("auto", "target actions: policy (a later policy's), critic (one critic step), auto",
                           one_of(("auto", "policy", "critic")), choices=("auto", "policy", "critic"))
    projection: str = inherit(HarvestConfig, "projection", "gaussian")
    proj_dim: int = inherit(HarvestConfig, "proj_dim", 128)
    proj_seed: int = inherit(HarvestConfig, "proj_seed")
    action_step: float = setting(0.3, "critic step eta in action units (targets='critic')", positive_number())
    ridge: float = setting(1.0, "GradEx lambda relative to the mean per-sample squared Jacobian norm / k",
                           positive_number())
    weighting: str = inherit(AnalysisConfig, "weighting")
    n_subsets: int = inherit(AnalysisConfig, "n_subsets", 40)
    subset_size: Optional[int] = setting(None, "tasks per subset; 0: Bernoulli subset_p; None: round(0.7 K)",
                                         _subset_size)
    subset_p: float = inherit(AnalysisConfig, "subset_p", 0.7)
    episodes: int = setting(1, "rollout episodes per target task", int_at_least(1))
    rollout_seed: int = setting(0, "seed of the rollouts", int_at_least(0))
    max_episode_steps: Optional[int] = setting(None, "rollout length; None: the module's",
                                               int_at_least(1, optional=True))
    seed: int = inherit(AnalysisConfig, "seed")
    kernel: str = inherit(AnalysisConfig, "kernel")
    gamma: Optional[float] = inherit(AnalysisConfig, "gamma")
    alpha: Optional[float] = inherit(AnalysisConfig, "alpha")
    holdout: float = inherit(AnalysisConfig, "holdout")
    ensemble_samples: int = inherit(AnalysisConfig, "ensemble_samples")
    n_groups: Optional[int] = inherit(AnalysisConfig, "n_groups")
    best_subset_size: Optional[int] = inherit(AnalysisConfig, "best_subset_size")
    top_k: int = setting(3, "co-training partners listed per target", int_at_least(1))

    def validate(self, n_tasks: int) -> None:
        """Check every setting against the number of source tasks before any work starts."""
        self._check_fields()
        if self.top_k >= n_tasks:
            raise ValueError(f"top_k={self.top_k} partners need at least top_k + 1 = {self.top_k + 1} tasks, got {n_tasks}")
        self.analysis_config(n_tasks, lam=1.0).validate(n_tasks)

    def resolved_subset_size(self, n_tasks: int) -> Optional[int]:
        """The number of tasks per subset (None: Bernoulli ``subset_p``)."""
        if self.subset_size == 0:
            return None
        if self.subset_size is None:
            return int(min(n_tasks - 1, max(1, round(0.7 * n_tasks))))
        return int(self.subset_size)

    def analysis_config(self, n_tasks: int, *, lam: float) -> AnalysisConfig:
        """The engine's :class:`AnalysisConfig`: every shared setting by name, ``lam`` absolute."""
        shared = {f.name: getattr(self, f.name) for f in fields(AnalysisConfig) if hasattr(self, f.name)}
        shared.update(subset_size=self.resolved_subset_size(n_tasks), lam=float(lam), loss="squared")
        return AnalysisConfig(**shared)
