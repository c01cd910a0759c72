"""lightning-ksm: kernel surrogate models for task attribution (Zhang, Duan, Zhang, ICLR 2026).

Public names: the settings (:class:`HarvestConfig`, :class:`AnalysisConfig`), the harvest
(:func:`harvest`, :class:`HarvestRunner`, :class:`FeatureStore`), GradEx (:func:`gradex`),
:func:`sample_subsets`, :class:`LinearSurrogate`, :class:`KernelSurrogate`, :func:`lds`, the
readouts of :mod:`lightning_ksm.readouts`, :class:`AttributionReport`, :func:`analyze` (with
:func:`run_analysis` / :func:`analyze_store` / :func:`report_from_losses` for each kind of input),
and the Lightning callback :class:`TaskAttribution` (``lightning_ksm.pl.TaskAttribution`` for the
``pytorch_lightning`` namespace). The package layout: ``docs/architecture.md``.

Names are imported on first use: ``import lightning_ksm`` stays cheap (the command line starts
fast) and the engine never imports Lightning unless you ask for the callback.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "HarvestConfig": "config",
    "AnalysisConfig": "config",
    "harvest": "harvesting",
    "HarvestRunner": "harvesting",
    "gradex": "estimation",
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
    "loo_scores": "readouts",
    "ensemble_scores": "readouts",
    "interaction_matrix": "readouts",
    "best_subset": "readouts",
    "cotraining_groups": "readouts",
    "AttributionReport": "report",
    "analyze": "analysis",
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
