"""lightning-ksm: kernel surrogate models for task attribution (Zhang, Duan, Zhang, ICLR 2026).

Public names: :func:`sample_subsets`, :class:`LinearSurrogate`, :class:`KernelSurrogate`,
:func:`lds`, the readouts of :mod:`lightning_ksm.attribution`, :class:`AttributionReport`,
:func:`run_analysis` / :func:`analyze_store`, and the Lightning callback :class:`TaskAttribution`
(``lightning_ksm.pl.TaskAttribution`` for the ``pytorch_lightning`` namespace).

Names are imported on first use: ``import lightning_ksm`` stays cheap (the command line starts
fast) and the engine never imports Lightning unless you ask for the callback.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "sample_subsets": "subsets",
    "all_subsets": "subsets",
    "leave_one_out_subsets": "subsets",
    "leave_pair_out_subsets": "subsets",
    "LinearSurrogate": "surrogates",
    "KernelSurrogate": "surrogates",
    "lds": "metrics",
    "pearson": "metrics",
    "residual_error": "metrics",
    "relative_error": "metrics",
    "loo_scores": "attribution",
    "ensemble_scores": "attribution",
    "interaction_matrix": "attribution",
    "best_subset": "attribution",
    "cotraining_groups": "attribution",
    "AttributionReport": "report",
    "AnalysisConfig": "analysis",
    "run_analysis": "analysis",
    "analyze_store": "analysis",
    "report_from_losses": "analysis",
    "FeatureStore": "store",
    "HarvestedFeatures": "features",
    "TaskAttribution": "_lightning",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ksm' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
