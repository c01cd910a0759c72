"""Intervals for every readout: a seeded bootstrap over the m fitted subsets.

Each replicate refits a clone of the surrogate on m subsets drawn with replacement from the fitted
ones (a kernel surrogate keeps the gamma and alpha chosen on the full data, so a replicate costs
one m x m solve) and recomputes the readouts on the *same* evaluation designs (the same ensemble
subsets, the same query subsets: common random numbers, so a difference between two tasks in a
replicate is a real difference of that replicate's fit). The intervals at ``level`` are the
percentile intervals of the replicates, widened where needed to contain the point estimate (a ridge
fit on a resample with repeated rows can sit to one side of the fit on all rows).

Measured coverage (tests/test_recommendations.py, a planted quadratic with noise, 16 data sets):
0.85 for nominal 0.9 with the hyperparameters fixed; re-selecting them in every replicate gives
0.93 but costs ten times more, so it is not the default.

What the intervals cover: the variation of the readout over resampled training subsets (the
surrogate's estimation noise given the outcomes, including noise in those outcomes). They do not
cover the error of the outcomes themselves (GradEx's linearization or a different seed of real
training) nor the choice of gamma and alpha.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone

from .._progress import progress_bar
from .scores import _ensemble_from, _interactions_from, _predict2d, interaction_design

__all__ = ["bootstrap_readouts", "BootstrapDraws", "percentile_interval", "bootstrap_interval"]


def percentile_interval(draws: np.ndarray, level: float, axis: int = 0) -> np.ndarray:
    """``(2, ...)`` lower and upper percentiles of ``draws`` along ``axis`` at coverage ``level``."""
    a = (1.0 - level) / 2.0
    return np.quantile(draws, [a, 1.0 - a], axis=axis)


def bootstrap_interval(draws: np.ndarray, estimate, level: float) -> np.ndarray:
    """``(2, ...)`` percentile interval of the replicates (axis 0), widened to contain ``estimate``."""
    q = percentile_interval(draws, level)
    x = np.asarray(estimate, dtype=np.float64)
    return np.stack([np.minimum(q[0], x), np.maximum(q[1], x)])


@dataclass
class BootstrapDraws:
    """Replicate readouts: ``ensemble`` / ``loo`` (B, K, T), ``interactions`` (B, T_i, K, K) for the
    columns ``interaction_columns``, ``queries`` (B, Q, T) predictions on the query subsets."""

    level: float
    n_boot: int
    ensemble: np.ndarray | None = None
    loo: np.ndarray | None = None
    interactions: np.ndarray | None = None
    interaction_columns: list = field(default_factory=list)
    queries: np.ndarray | None = None

    def interval(self, name: str) -> np.ndarray:
        """``(2, ...)`` percentile interval of one kind of draw."""
        return percentile_interval(getattr(self, name), self.level)


def _fixed(surrogate):
    """A clone with the selected hyperparameters fixed (no selection per replicate)."""
    est = clone(surrogate)
    params = est.get_params()
    for name in ("gamma", "alpha"):
        value = getattr(surrogate, name + "_", None)
        if name in params and value is not None:
            est.set_params(**{name: value})
    return est


def bootstrap_readouts(
    surrogate,
    S,
    F,
    *,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    ensemble_subsets=None,
    queries=None,
    interaction_columns=(),
    readouts=("ensemble", "loo"),
    progress: bool = False,
) -> BootstrapDraws:
    """Bootstrap the readouts of ``surrogate`` (fitted on ``S`` (m, K), ``F`` (m, T)).

    Args:
        n_boot: replicates.
        level: coverage of the intervals (e.g. 0.9).
        seed: seed of the resampling.
        ensemble_subsets: the subsets of the ensemble score (same as the point estimate's; required
            for ``"ensemble"``).
        queries: (Q, K) subsets whose predicted losses are drawn (recommended subsets, groups).
        interaction_columns: target columns whose interaction matrices are drawn.
        readouts: which of "ensemble" and "loo" to draw.
        progress: show a progress bar over the replicates.
    """
    S = np.asarray(S, dtype=bool)
    F = np.asarray(F, dtype=np.float64).reshape(len(S), -1)
    m, K = S.shape
    rng = np.random.default_rng(seed)
    est = _fixed(surrogate)
    cols = [int(c) for c in interaction_columns]
    loo_design = np.vstack([np.ones((1, K)), 1.0 - np.eye(K)])
    inter_design = interaction_design(K) if cols else None
    Q = None if queries is None else np.asarray(queries, dtype=np.float64).reshape(-1, K)
    out = BootstrapDraws(level=level, n_boot=n_boot, interaction_columns=cols)
    ens, loo, inter, qd = [], [], [], []
    resamples = []
    for _ in range(n_boot):
        idx = rng.integers(0, m, size=m)
        if len(np.unique(S[idx], axis=0)) < 2:
            idx = rng.permutation(m)
        resamples.append(idx)
    designs = {}
    if "ensemble" in readouts:
        designs["ensemble"] = ensemble_subsets.astype(np.float64)
    if "loo" in readouts:
        designs["loo"] = loo_design
    if cols:
        designs["inter"] = inter_design
    if Q is not None and len(Q):
        designs["queries"] = Q
    if hasattr(surrogate, "refit_predictions") and hasattr(surrogate, "dual_coef_"):  # kernels once, sliced
        replicates = surrogate.refit_predictions(S, F, resamples, list(designs.values()))
    else:
        replicates = ([_predict2d(model, D) for D in designs.values()]
                      for model in (clone(est).fit(S[idx], F[idx]) for idx in resamples))
    bar = progress_bar(n_boot, progress, "bootstrap intervals", "replicate")
    for preds in replicates:
        if bar is not None:
            bar.update(1)
        pred = dict(zip(designs, preds))
        if "ensemble" in pred:
            ens.append(_ensemble_from(ensemble_subsets, pred["ensemble"]))
        if "loo" in pred:
            loo.append(pred["loo"][1:] - pred["loo"][:1])
        if "inter" in pred:
            inter.append(_interactions_from(K, pred["inter"][:, cols]).astype(np.float32))
        if "queries" in pred:
            qd.append(pred["queries"])
    if bar is not None:
        bar.close()
    out.ensemble = np.stack(ens) if ens else None
    out.loo = np.stack(loo) if loo else None
    out.interactions = np.stack(inter) if inter else None
    out.queries = np.stack(qd) if qd else None
    return out
