"""The post-harvest analysis: GradEx over sampled subsets -> surrogate -> readouts -> report.

This is the engine entry point shared by the Lightning callback, the ``lightning-ksm analyze`` CLI
and the RL adapter. It needs only harvested features (in memory or in a :class:`FeatureStore`),
never the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from math import comb

import numpy as np

from .attribution import (
    best_subset,
    cotraining_groups,
    ensemble_scores,
    interaction_matrix,
    loo_scores,
)
from .evaluation import holdout_quality
from .features import HarvestedFeatures
from .gradex import gradex
from .report import AttributionReport
from .subsets import sample_subsets
from .surrogates import KernelSurrogate, LinearSurrogate

__all__ = ["AnalysisConfig", "run_analysis", "report_from_losses", "analyze_store", "present_tasks_only"]


@dataclass
class AnalysisConfig:
    """Settings of the analysis after the harvest (all JSON-able; stored in the report).

    Subsets:
        n_subsets: number of random task subsets m solved by GradEx.
        subset_p: Bernoulli inclusion probability of each task (ignored when ``subset_size`` is set).
            The default 0.75 sits between the paper's 0.9 (modular arithmetic) and 0.7 (7 of 10 RL
            tasks): subsets stay close to the full mixture, where leave-one-out and interaction
            readouts are evaluated, while every task is still left out often enough.
        subset_size: exact number of tasks per subset instead of ``subset_p``.
        seed: seed of subset sampling, the held-out split and the ensemble readout.
    GradEx:
        lam: ridge strength of the linearized fine-tuning problem (see docs/gradex.md).
        loss: "cross_entropy" / "logistic" / "squared"; None chooses from the output mode.
        weighting: "task" (each selected task weighs the same, paper eq. 1) or "sample".
    Surrogate:
        kernel, gamma, alpha: passed to :class:`KernelSurrogate` (None = selected by leave-one-out).
        holdout: fraction of subsets held out to report the surrogate's fit quality (LDS).
    Readouts:
        ensemble_samples: subsets sampled for the random-ensemble scores.
        n_groups: co-training groups (None: about sqrt(K / 2), at least 2).
        best_subset_size: size of the recommended subset per target (None: any size).
        max_exact: enumerate all candidate subsets up to this many, else local search.
    """

    n_subsets: int = 200
    subset_p: float = 0.75
    subset_size: int | None = None
    seed: int = 0
    lam: float = 1e-3
    loss: str | None = None
    weighting: str = "task"
    kernel: str = "rbf"
    gamma: float | None = None
    alpha: float | None = None
    holdout: float = 0.2
    ensemble_samples: int = 4000
    n_groups: int | None = None
    best_subset_size: int | None = None
    max_exact: int = 50_000

    @classmethod
    def from_dict(cls, data: dict) -> "AnalysisConfig":
        """Build from a dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown analysis setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, n_tasks: int | None) -> None:
        """Check every setting (against the number of source tasks when known) before any work starts."""
        if n_tasks is not None and n_tasks < 2:
            raise ValueError(f"task attribution needs at least 2 source tasks, the harvest has {n_tasks}")
        if self.weighting not in ("task", "sample"):
            raise ValueError(f"weighting must be 'task' or 'sample', got {self.weighting!r}")
        if self.kernel not in ("rbf", "poly", "polynomial", "linear"):
            raise ValueError(f"kernel must be 'rbf', 'poly' or 'linear', got {self.kernel!r}")
        if self.loss not in (None, "cross_entropy", "logistic", "squared"):
            raise ValueError(f"loss must be None, 'cross_entropy', 'logistic' or 'squared', got {self.loss!r}")
        if n_tasks is None:
            n_tasks = 10**9  # only the checks that do not need K
        if not isinstance(self.n_subsets, int) or self.n_subsets < 10:
            raise ValueError(f"n_subsets must be an integer >= 10, got {self.n_subsets!r}")
        if self.subset_size is not None and (not isinstance(self.subset_size, int) or not 1 <= self.subset_size <= n_tasks):
            raise ValueError(f"subset_size must be between 1 and the number of tasks ({n_tasks}), got {self.subset_size}")
        if self.subset_size is None and not 0 < self.subset_p < 1:
            raise ValueError(f"subset_p must be in (0, 1), got {self.subset_p}")
        if not 0 < self.holdout < 0.9:
            raise ValueError(f"holdout must be a fraction in (0, 0.9), got {self.holdout}")
        if self.lam <= 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if self.n_groups is not None and not 1 <= self.n_groups <= n_tasks:
            raise ValueError(f"n_groups must be between 1 and the number of tasks ({n_tasks}), got {self.n_groups}")
        if self.best_subset_size is not None and not 1 <= self.best_subset_size <= n_tasks:
            raise ValueError(
                f"best_subset_size must be between 1 and the number of tasks ({n_tasks}), got {self.best_subset_size}"
            )

    def n_possible_subsets(self, n_tasks: int) -> int:
        return comb(n_tasks, self.subset_size) if self.subset_size is not None else 2**n_tasks - 1


def _default_groups(K: int) -> int:
    return int(min(K, max(2, round(np.sqrt(K / 2)))))


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
    cfg = AnalysisConfig.from_dict(config) if isinstance(config, dict) else (config or AnalysisConfig())
    task_names = [str(t) for t in source.task_names]
    K = len(task_names)
    cfg.validate(K)
    if target.n_samples == 0:
        raise ValueError("the target split has no samples; check the target dataloader")
    timings = dict(timings or {})

    # 1. subsets; unique when there are enough distinct subsets to draw from.
    unique = cfg.n_possible_subsets(K) >= 2 * cfg.n_subsets
    S = sample_subsets(
        K, cfg.n_subsets, p=None if cfg.subset_size else cfg.subset_p, size=cfg.subset_size,
        seed=cfg.seed, unique=unique,
    )

    # 2. GradEx: F^(s) for every subset and target column.
    start = time.perf_counter()
    result = gradex(source, target, S, lam=cfg.lam, loss=cfg.loss, weighting=cfg.weighting, progress=progress)
    timings["gradex"] = time.perf_counter() - start
    extra = dict(extra_config or {})
    fit_extra = {"gradex_converged": int(np.sum(result.converged)), "gradex_loss": result.loss}
    return report_from_losses(
        S, result.losses, task_names, [str(t) for t in result.target_names], cfg,
        timings=timings, extra_config=extra, extra_fit_quality=fit_extra,
    )


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
) -> AttributionReport:
    """Surrogate fit, fit quality and every readout, from outcomes already measured or estimated.

    ``S`` is the (m, K) subset matrix and ``F`` the (m, T) losses on those subsets (from GradEx, real
    retraining or RL rollouts). The kernel surrogate (and, as a baseline, the linear one) is scored
    on held-out subsets, refitted on all of them, and read out into an :class:`AttributionReport`.
    """
    cfg = AnalysisConfig.from_dict(config) if isinstance(config, dict) else (config or AnalysisConfig())
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
    kernel = KernelSurrogate(kernel=cfg.kernel, gamma=cfg.gamma, alpha=cfg.alpha)
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

    # 4. readouts.
    start = time.perf_counter()
    scores = {
        "ensemble": ensemble_scores(surrogate, n_samples=cfg.ensemble_samples, seed=cfg.seed),
        "loo": loo_scores(surrogate),
        # The linear surrogate's coefficients, as a baseline: -b_k is the loss drop from task k.
        "linear": -np.atleast_2d(linear.coef_).T.reshape(K, -1),
    }
    interactions = interaction_matrix(surrogate)
    full_loss = surrogate.predict(np.ones((1, K)))[0]
    best = []
    for t, name in enumerate(target_names):
        b = best_subset(surrogate, size=cfg.best_subset_size, target=t, max_exact=cfg.max_exact, seed=cfg.seed)
        best.append({
            "target": name,
            "size": len(b.tasks),
            "tasks": [task_names[i] for i in b.tasks],
            "predicted_loss": b.predicted_loss,
            "full_set_loss": float(full_loss[t]),
            "exact": b.exact,
        })
    groups = []
    if all(name in target_names for name in task_names):
        n_groups = cfg.n_groups or _default_groups(K)
        cols = np.array([target_names.index(name) for name in task_names])
        for g in cotraining_groups(surrogate, n_groups, target_columns=cols, seed=cfg.seed,
                                   ensemble_samples=cfg.ensemble_samples):
            groups.append({
                "tasks": [task_names[i] for i in g.tasks],
                "predicted_loss": g.predicted_loss,
                "member_losses": dict(zip([task_names[i] for i in g.tasks], g.member_losses)),
                "all_tasks_loss": g.all_tasks_loss,
            })
    else:
        notes.append(
            "co-training groups need every source task to also be a target (the same task ids in "
            "the target data); they were skipped"
        )
    timings["readouts"] = time.perf_counter() - start

    fit_quality = {
        "heldout_lds": quality["kernel"]["heldout_lds"],
        "heldout_residual_error": quality["kernel"]["heldout_residual_error"],
        "linear_heldout_lds": quality["linear"]["heldout_lds"],
        "linear_heldout_residual_error": quality["linear"]["heldout_residual_error"],
        "n_train_subsets": quality["kernel"]["n_train_subsets"],
        "n_heldout_subsets": quality["kernel"]["n_heldout_subsets"],
        "surrogate": {"kernel": cfg.kernel, "gamma": surrogate.gamma_, "alpha": surrogate.alpha_},
        **(extra_fit_quality or {}),
    }
    if notes:
        fit_quality["notes"] = notes
    config_record = {"analysis": cfg.to_dict(), **(extra_config or {})}
    report = AttributionReport(
        task_names=task_names,
        target_names=target_names,
        scores=scores,
        default_method="ensemble",
        interactions=interactions,
        best_subsets=best,
        groups=groups,
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
    return HarvestedFeatures(
        outputs=features.outputs, jacobians=features.jacobians, labels=features.labels,
        task_ids=remap[np.asarray(features.task_ids)], task_names=[features.task_names[i] for i in present],
        mode=features.mode,
    )


def analyze_store(
    directory,
    config: AnalysisConfig | dict | None = None,
    *,
    progress: bool = False,
    timings: dict | None = None,
    extra_config: dict | None = None,
) -> AttributionReport:
    """Run (or re-run, with new settings) the analysis of a saved harvest (a :class:`FeatureStore`
    directory with "source" and "target" splits). The model is not needed."""
    from .store import FeatureStore

    store = FeatureStore(directory)
    if not store.exists():
        raise FileNotFoundError(f"no harvest found in {directory} (missing manifest.json)")
    source = present_tasks_only(store.load("source"))
    target = present_tasks_only(store.load("target"))
    manifest = store.manifest()
    extra = {"harvest": {k: v for k, v in manifest.items() if k not in ("splits", "params")}}
    extra["harvest"]["n_params"] = len(manifest.get("params", []))
    extra.update(extra_config or {})
    return run_analysis(source, target, config, timings=timings, extra_config=extra, progress=progress)
