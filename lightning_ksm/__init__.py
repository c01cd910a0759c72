"""lightning-ksm: kernel surrogate models for task attribution (Zhang, Duan, Zhang, ICLR 2026).

Public names: :func:`sample_subsets`, :class:`LinearSurrogate`, :class:`KernelSurrogate`,
:func:`lds` and the readouts in :mod:`lightning_ksm.attribution`.
"""

from .analysis import AnalysisConfig, analyze_store, run_analysis
from .attribution import (
    best_subset,
    cotraining_groups,
    ensemble_scores,
    interaction_matrix,
    loo_scores,
)
from .report import AttributionReport
from .metrics import lds, pearson, relative_error, residual_error
from .subsets import all_subsets, leave_one_out_subsets, leave_pair_out_subsets, sample_subsets
from .surrogates import KernelSurrogate, LinearSurrogate

__version__ = "0.1.0"


def __getattr__(name):
    # The callback imports Lightning (seconds); the engine must stay importable without it.
    if name == "TaskAttribution":
        from ._lightning import TaskAttribution

        return TaskAttribution
    raise AttributeError(f"module 'lightning_ksm' has no attribute {name!r}")


__all__ = [
    "sample_subsets",
    "all_subsets",
    "leave_one_out_subsets",
    "leave_pair_out_subsets",
    "LinearSurrogate",
    "KernelSurrogate",
    "lds",
    "pearson",
    "residual_error",
    "relative_error",
    "loo_scores",
    "ensemble_scores",
    "interaction_matrix",
    "best_subset",
    "cotraining_groups",
    "AttributionReport",
    "AnalysisConfig",
    "run_analysis",
    "analyze_store",
    "TaskAttribution",
]
