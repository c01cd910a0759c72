"""The post-harvest analysis: GradEx over sampled subsets -> surrogate -> readouts -> report.

This is the engine entry point shared by the Lightning callback, the ``lightning-ksm analyze`` CLI
and the RL adapter. It needs only harvested features (in memory or in a :class:`FeatureStore`),
never the model.
"""

from __future__ import annotations

import dataclasses

import json
import os
import time

import numpy as np

from ._threads import pinned_threads
from .assemble import assemble_readouts, default_groups, withhold_magnitudes
from .config import AnalysisConfig
from .estimation import estimate_subsets, resolve_estimator
from .estimation.checks import diverged_run_notes, linear_regime_notes
from .estimation.epochs import run_record_notes, undrawn_tasks
from .estimation.selfcheck import self_check, self_check_notes
from .features import HarvestedFeatures
from .quality import holdout_quality
from .report import AttributionReport
from .subsets import sample_subsets
from .surrogates import KernelSurrogate, LinearSurrogate
from .task_ids import POOLED_TARGET

__all__ = ["AnalysisConfig", "analyze", "run_analysis", "report_from_losses", "analyze_store", "present_tasks_only"]


_default_groups = default_groups  # the earlier private name


def run_analysis(
    source: HarvestedFeatures,
    target: HarvestedFeatures,
    config: AnalysisConfig | dict | None = None,
    *,
    timings: dict | None = None,
    extra_config: dict | None = None,
    progress: bool = False,
) -> AttributionReport:
    """GradEx on sampled subsets, a kernel surrogate, and every readout, as an :class:`AttributionReport`.

    Args:
        source: harvested features of the source (training) tasks.
        target: harvested features of the target data; its task ids become target columns, plus "all".
        config: an :class:`AnalysisConfig` (or a dict of its fields); defaults when None.
        timings: seconds of earlier stages (e.g. the harvest) to record in the report.
        extra_config: more JSON-able settings to record (e.g. the harvest's).
        progress: show progress bars.
    """
    cfg = AnalysisConfig.coerce(config)
    task_names = [str(t) for t in source.task_names]
    K = len(task_names)
    cfg.validate(K)
    if target.n_samples == 0:
        raise ValueError("the target split has no samples; check the target dataloader")
    if POOLED_TARGET in [str(t) for t in target.task_names]:  # older harvests (the callback now refuses it at train start)
        raise ValueError(
            f"the target data has a task id (or a target loader without task ids) named {POOLED_TARGET!r}, the "
            "report's name for every target sample pooled; rename that task or loader and harvest again"
        )
    with pinned_threads(cfg.threads):
        return _run_analysis(source, target, cfg, task_names, dict(timings or {}), extra_config, progress)


def _run_analysis(source, target, cfg, task_names, timings, extra_config, progress) -> AttributionReport:
    run = (extra_config or {}).get("run")
    record_warnings, record_notes = [], []
    if resolve_estimator(cfg, run) == "simulate":  # the estimate follows the watched run: what it drew
        left_out = undrawn_tasks(run, source.task_names)
        if left_out:
            source = _without_tasks(source, left_out)
            task_names = [str(t) for t in source.task_names]
        counts = np.bincount(np.asarray(source.task_ids, dtype=np.int64), minlength=len(source.task_names))
        record_warnings, record_notes = run_record_notes(run, source.task_names, counts, cfg.calibrate, left_out)
    K = len(task_names)
    # 0. the self-check: which estimator follows the watched run on the all-tasks subset (one subset each)
    start = time.perf_counter()
    used, check = self_check(source, target, cfg, run)
    timings["self_check"] = time.perf_counter() - start  # its own stage: it runs estimators too

    # 1. subsets; unique when there are enough distinct subsets to draw from.
    unique = cfg.n_possible_subsets(K) >= 2 * cfg.n_subsets
    S = sample_subsets(
        K, cfg.n_subsets, p=None if cfg.subset_size else cfg.subset_p, size=cfg.subset_size,
        seed=cfg.seed, unique=unique,
    )

    # 2. GradEx: F^(s) for every subset and target column.
    start = time.perf_counter()
    result = estimate_subsets(source, target, S, used, run=run, progress=progress)
    timings["gradex"] = time.perf_counter() - start
    extra = dict(extra_config or {})
    fit_extra = {"gradex_converged": int(np.sum(result.converged)), "gradex_loss": result.loss,
                 "estimator": result.extras["estimator"]}
    for key in ("adam_as", "calibrate", "steps", "exact_readout", "effect_scale", "all_tasks_change"):  # how F^ was made
        if key in result.extras:
            fit_extra[f"gradex_{key}"] = result.extras[key]
    report = report_from_losses(
        S, result.losses, task_names, [str(t) for t in result.target_names], cfg,
        timings=timings, extra_config=extra, extra_fit_quality=fit_extra, loss_lower_bound=0.0, progress=progress,
        # best-subset candidates are re-scored by the same estimator (GradEx) that gave F^
        rescore=lambda masks: estimate_subsets(source, target, masks, used, run=run).losses,
    )
    if check is None:
        regime = linear_regime_notes(result.extras.get("all_tasks_change"), columns=report.target_names)
    else:  # the self-check compared every candidate with the run: its words replace the regime check's
        report.fit_quality["self_check"] = check
        regime, check_notes = self_check_notes(check)
        record_notes = record_notes + check_notes  # the run record's notes qualify the run itself: first
        if check["grade"] in ("direction only", "does not follow"):
            report = withhold_magnitudes(report, regime[0])
    if regime:  # warnings are said first (text, HTML, command line): they qualify every number
        report.fit_quality["linear_regime"] = False
    fq = report.fit_quality
    if record_warnings or regime:
        fq["warnings"] = record_warnings + list(fq.get("warnings", [])) + regime
    if record_notes:
        fq["notes"] = record_notes + list(fq.get("notes", []))
    diverged = diverged_run_notes(run)
    if diverged:  # before any other warning: no number here comes from the training that was run
        fq["run_diverged"] = True
        fq["warnings"] = diverged + list(fq.get("warnings", []))
    return report


def report_from_losses(
    S,
    F,
    task_names,
    target_names,
    config: AnalysisConfig | dict | None = None,
    *,
    timings: dict | None = None,
    extra_config: dict | None = None,
    extra_fit_quality: dict | None = None,
    rescore=None,
    loss_lower_bound: float | None = None,
    progress: bool = False,
) -> AttributionReport:
    """Surrogate fit, fit quality and every readout, from outcomes already measured or estimated.

    ``S`` is the (m, K) subset matrix and ``F`` the (m, T) losses on those subsets (from GradEx, real
    retraining or RL rollouts). The kernel surrogate (and, as a baseline, the linear one) is scored
    on held-out subsets, refitted on all of them, and read out into an :class:`AttributionReport`
    with bootstrap intervals (:mod:`lightning_ksm.assemble`). ``rescore(masks) -> (n, T)`` losses
    (e.g. GradEx) re-scores the best-subset candidates; ``loss_lower_bound`` is the lowest possible
    loss (default 0 when every F is >= 0, else unknown): no prediction below it is recommended;
    ``progress`` shows progress bars over the readouts' long loops.
    """
    cfg = AnalysisConfig.coerce(config)
    with pinned_threads(cfg.threads):
        return _report_from_losses(S, F, task_names, target_names, cfg, timings, extra_config, extra_fit_quality,
                                   rescore, loss_lower_bound, progress)


def _report_from_losses(S, F, task_names, target_names, cfg, timings, extra_config, extra_fit_quality, rescore,
                        loss_lower_bound, progress) -> AttributionReport:
    task_names = [str(t) for t in task_names]
    target_names = [str(t) for t in target_names]
    K = len(task_names)
    cfg.validate(K)
    S = np.asarray(S, dtype=bool)
    F = np.asarray(F, dtype=np.float64)
    if F.ndim == 1:
        F = F[:, None]
    if S.ndim != 2 or S.shape[1] != K or F.shape != (len(S), len(target_names)):
        raise ValueError(
            f"subsets of shape {S.shape} and losses of shape {F.shape} do not match "
            f"{K} task names and {len(target_names)} target names"
        )
    timings = dict(timings or {})

    # 3. surrogate: fit quality on held-out subsets, then the final fit on all of them.
    start = time.perf_counter()
    kernel = KernelSurrogate(kernel=cfg.kernel, gamma=cfg.gamma, alpha=cfg.alpha, selection=cfg.selection)
    notes = []
    quality = {}
    for name, est in (("kernel", kernel), ("linear", LinearSurrogate())):
        try:
            quality[name] = holdout_quality(est, S, F, holdout=cfg.holdout, seed=cfg.seed)
        except ValueError as exc:
            # Too few distinct subsets (or constant held-out outcomes) to measure the fit: the
            # readouts are still computed, and the report says the fit quality is unknown.
            quality[name] = {"heldout_lds": None, "heldout_residual_error": None,
                             "n_train_subsets": None, "n_heldout_subsets": None}
            if not notes:
                notes.append(f"held-out fit quality could not be measured: {exc}")
    surrogate = kernel.fit(S, F)
    linear = LinearSurrogate().fit(S, F)
    timings["surrogate"] = time.perf_counter() - start

    # 4. readouts, with intervals, inside the surrogate's support (see assemble.py).
    start = time.perf_counter()
    if loss_lower_bound is None and np.nanmin(F) >= 0:
        loss_lower_bound = 0.0  # a loss never negative on m subsets is treated as a non-negative loss
    out = assemble_readouts(surrogate, linear, S, F, task_names, target_names, cfg, rescore=rescore,
                            lower_bound=loss_lower_bound, progress=progress)
    notes += out["notes"]
    timings["readouts"] = time.perf_counter() - start

    fit_quality = {
        "heldout_lds": quality["kernel"]["heldout_lds"],
        "heldout_residual_error": quality["kernel"]["heldout_residual_error"],
        "linear_heldout_lds": quality["linear"]["heldout_lds"],
        "linear_heldout_residual_error": quality["linear"]["heldout_residual_error"],
        "n_train_subsets": quality["kernel"]["n_train_subsets"],
        "n_heldout_subsets": quality["kernel"]["n_heldout_subsets"],
        "surrogate": {"kernel": cfg.kernel, "gamma": surrogate.gamma_, "alpha": surrogate.alpha_},
        "support": out["support"],
        "loss_lower_bound": loss_lower_bound,
        **(extra_fit_quality or {}),
    }
    if notes:
        fit_quality["notes"] = notes
    config_record = {"analysis": cfg.to_dict(), **(extra_config or {})}
    report = AttributionReport(
        task_names=task_names,
        target_names=target_names,
        scores=out["scores"],
        default_method="ensemble",
        interactions=out["interactions"],
        best_subsets=out["best_subsets"],
        groups=out["groups"],
        intervals=out["intervals"],
        fit_quality=fit_quality,
        subsets=S,
        losses=F,
        config=config_record,
        seeds={"analysis": cfg.seed, **({"projection": extra_config["projection_seed"]}
                                        if extra_config and "projection_seed" in extra_config else {})},
        timings=timings,
    )
    # Kept (not saved) for callers that want to predict more subsets, e.g. task selection.
    report.surrogate_, report.linear_surrogate_ = surrogate, linear
    return report


def _without_tasks(features: HarvestedFeatures, tasks) -> HarvestedFeatures:
    """The features without the samples of ``tasks`` (task ids remapped to the remaining tasks)."""
    gone = {str(t) for t in tasks}
    keep = np.array([str(t) not in gone for t in features.task_names])
    return present_tasks_only(features.subset(np.flatnonzero(keep[np.asarray(features.task_ids)])))


def present_tasks_only(features: HarvestedFeatures) -> HarvestedFeatures:
    """The same features with ``task_names`` reduced to the tasks that have samples (ids remapped).

    A feature store shares one task list across splits; the source split must not carry target-only
    tasks (they would be subset columns with no samples).
    """
    present = np.unique(np.asarray(features.task_ids))
    if len(present) == len(features.task_names):
        return features
    remap = np.full(len(features.task_names), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    return dataclasses.replace(
        features, task_ids=remap[np.asarray(features.task_ids)], task_names=[features.task_names[i] for i in present],
    )


def _saved_run_record(directory, manifest: dict, cfg: AnalysisConfig) -> dict:
    """``{"run": record}`` from the callback's run record ``<run dir>/run.json`` next to the harvest,
    or ``{}``. A callback's harvest (its manifest names W0) without one is refused for
    ``estimator="auto"``, which would otherwise silently become the proximal solve."""
    path = os.path.join(os.path.dirname(os.path.abspath(directory)), "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return {"run": json.load(fh)}
    if cfg.estimator == "auto" and (manifest.get("meta") or {}).get("w0_sha256"):
        raise ValueError(
            f"the harvest in {directory} was made by the TaskAttribution callback, but the record of its "
            f"training run ({path}) is missing: the run did not reach the end of fit, or run.json was not kept "
            f"with the harvest. estimator='auto' follows that run (the 'simulate' estimator) and cannot without "
            f"it: pass estimator='proximal' (lightning-ksm analyze: --estimator proximal) for GradEx's proximal "
            f"solve at W0, or put run.json back"
        )
    return {}


def analyze_store(
    directory,
    config: AnalysisConfig | dict | None = None,
    *,
    progress: bool = False,
    timings: dict | None = None,
    extra_config: dict | None = None,
    allow_partial: bool = False,
) -> AttributionReport:
    """Run (or re-run, with new settings) the analysis of a saved harvest (a :class:`FeatureStore`
    directory with "source" and "target" splits). The model is not needed.

    An incomplete harvest raises :class:`~lightning_ksm.store.IncompleteHarvestError` and a damaged
    shard :class:`~lightning_ksm.store.CorruptStoreError`; with ``allow_partial=True`` the harvest is
    analysed without what is missing or damaged (each damaged shard is warned about and named) and the
    report says so (``fit_quality["partial_harvest"]``, the first of ``fit_quality["notes"]``,
    ``config["harvest_status"]``, whose ``left_out`` lists the damaged shards)."""
    from .store import FeatureStore
    from .store.plan import describe_status, with_left_out

    store = FeatureStore(directory)
    if not store.exists():
        raise FileNotFoundError(f"no harvest found in {directory} (missing manifest.json)")
    status = store.check_complete(allow_partial=allow_partial)
    manifest = store.manifest()
    extra = {"harvest": {k: v for k, v in manifest.items() if k not in ("splits", "params")}}
    extra["harvest"]["n_params"] = len(manifest.get("params", []))
    extra.update(extra_config or {})
    if "run" not in extra:
        extra.update(_saved_run_record(directory, manifest, AnalysisConfig.coerce(config)))
    source = present_tasks_only(store.load("source", allow_partial=allow_partial))
    target = present_tasks_only(store.load("target", allow_partial=allow_partial))
    status = with_left_out(status, store.left_out.get("source", []) + store.left_out.get("target", []))
    extra["harvest_status"] = status
    report = run_analysis(source, target, config, timings=timings, extra_config=extra, progress=progress)
    if status["complete"] is False:  # asked for explicitly: said first, wherever the report is read
        note = f"PARTIAL HARVEST: this report uses only part of the data ({describe_status(status)})"
        report.fit_quality["partial_harvest"] = True
        report.fit_quality["notes"] = [note] + list(report.fit_quality.get("notes", []))
    return report


def analyze(
    data=None,
    target: HarvestedFeatures | None = None,
    config: AnalysisConfig | dict | None = None,
    *,
    subsets=None,
    losses=None,
    task_names=None,
    target_names=None,
    progress: bool = False,
    timings: dict | None = None,
    extra_config: dict | None = None,
) -> AttributionReport:
    """The one entry point of the analysis, from whatever the caller has:

    - ``analyze(directory)``: a saved harvest (a feature store, or a callback's run directory that
      holds ``harvest/``); the model is not needed.
    - ``analyze(source_features, target_features)``: harvested features in memory (GradEx runs).
    - ``analyze(subsets=S, losses=F, task_names=..., target_names=...)``: outcomes already measured
      or estimated on subsets (real retraining, RL rollouts); GradEx does not run.

    ``config``: an :class:`AnalysisConfig` or a dict of its fields. Returns the report.
    """
    import os

    from .rundir import RunDirectory

    options = dict(timings=timings, extra_config=extra_config)
    if subsets is not None or losses is not None:
        if data is not None or target is not None or subsets is None or losses is None:
            raise ValueError("measured outcomes need subsets= and losses= (and no features or directory)")
        if task_names is None or target_names is None:
            raise ValueError("analyze(subsets=..., losses=...) needs task_names= and target_names=")
        return report_from_losses(subsets, losses, task_names, target_names, config, progress=progress, **options)
    if isinstance(data, (str, os.PathLike)):
        directory = os.fspath(data)
        run_harvest = RunDirectory(directory).harvest
        if not os.path.exists(os.path.join(directory, "manifest.json")) and os.path.isdir(run_harvest):
            directory = run_harvest
        return analyze_store(directory, config, progress=progress, **options)
    if isinstance(data, HarvestedFeatures):
        if not isinstance(target, HarvestedFeatures):
            raise ValueError("analyze(source_features, target_features): the target features are missing")
        return run_analysis(data, target, config, progress=progress, **options)
    raise TypeError(
        "analyze() takes a harvest directory, (source, target) HarvestedFeatures, or subsets= and losses=; "
        f"got {type(data).__name__}"
    )
