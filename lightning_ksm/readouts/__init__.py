"""Attribution readouts from any fitted surrogate g(s) (a LinearSurrogate, a KernelSurrogate, or any
scikit-learn regressor fitted on (m, K) 0/1 subsets).

Sign convention (everywhere in lightning-ksm): F and g are losses, lower is better. A task's score is
the predicted increase of the target loss when the task is removed, so **score > 0 means the task
helps** the target and score < 0 means it hurts.

One module per job: ``scores`` (leave-one-out and ensemble scores, interactions and their wording),
``support`` (where the surrogate has evidence), ``selection`` (best subsets inside the support),
``groups`` (co-training groups by predicted group outcomes), ``uncertainty`` (bootstrap intervals).
"""

from .groups import CoTrainingGroup, GroupSelection, cotraining_groups, select_groups, task_affinity
from .scores import (
    INTERACTION_CASES,
    ensemble_design,
    ensemble_scores,
    interaction_case,
    interaction_design,
    interaction_matrix,
    loo_scores,
)
from .selection import BestSubset, best_subset
from .support import SUPPORT_MODES, Support, support_of
from .uncertainty import BootstrapDraws, bootstrap_interval, bootstrap_readouts, percentile_interval

__all__ = [
    "loo_scores",
    "ensemble_scores",
    "ensemble_design",
    "interaction_matrix",
    "interaction_design",
    "interaction_case",
    "INTERACTION_CASES",
    "best_subset",
    "BestSubset",
    "Support",
    "SUPPORT_MODES",
    "support_of",
    "task_affinity",
    "cotraining_groups",
    "CoTrainingGroup",
    "select_groups",
    "GroupSelection",
    "bootstrap_readouts",
    "BootstrapDraws",
    "percentile_interval",
    "bootstrap_interval",
]
