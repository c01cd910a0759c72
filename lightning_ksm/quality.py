"""How well a surrogate predicts subsets it did not see: LDS and residual error on held-out subsets."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

from ._validation import check_subset_matrix, check_targets
from .metrics import lds, residual_error

__all__ = ["heldout_scores", "holdout_quality"]


def _fit_and_score(estimator, S_fit, y_fit, S_eval, y_true, y_own=None):
    """The shared core: fit a clone of ``estimator`` on ``(S_fit, y_fit)``, predict ``S_eval`` and
    score the predictions against ``y_true`` (and ``y_own``). Returns the fitted clone and
    ``{"lds", "residual_error"[, "lds_own", "residual_error_own"]}``."""
    model = clone(estimator).fit(S_fit, y_fit)
    pred = np.asarray(model.predict(S_eval)).reshape(np.shape(y_true))
    out = {"lds": float(lds(y_true, pred)), "residual_error": float(residual_error(y_true, pred))}
    if y_own is not None:
        out["lds_own"] = float(lds(y_own, pred))
        out["residual_error_own"] = float(residual_error(y_own, pred))
    return model, out


def heldout_scores(estimator, S_fit, y_fit, S_eval, y_true, *, y_own=None) -> dict:
    """Fit a clone of ``estimator`` on ``(S_fit, y_fit)``; score its predictions on ``S_eval``
    against ``y_true``: ``{"lds", "residual_error"}`` (means over target columns).

    With ``y_own`` (the held-out values of the same kind as ``y_fit``, e.g. GradEx's F^ when the
    surrogate was fitted on F^) also ``"lds_own"`` and ``"residual_error_own"``: how well the
    surrogate models what it was fitted on, apart from how well that agrees with ``y_true``.
    Kernel surrogates also report the chosen ``gamma`` and ``alpha``.
    """
    model, out = _fit_and_score(estimator, S_fit, y_fit, S_eval, y_true, y_own)
    for attr in ("gamma_", "alpha_"):
        if hasattr(model, attr):
            out[attr.rstrip("_")] = float(getattr(model, attr))
    return out


def holdout_quality(estimator, S, y, *, holdout: float = 0.2, seed: int = 0) -> dict:
    """Fit a clone of ``estimator`` on part of (S, y) and score it on the held-out rest.

    The split is by distinct subset: when a subset was sampled several times, all its rows land on
    the same side, so held-out subsets are never seen in training (with few tasks, random sampling
    repeats subsets and a row-wise split would report an optimistic score). Returns a dict with the
    held-out LDS, residual error and the split sizes (in rows). The estimator is not modified.
    Needs at least 2 distinct held-out and 2 distinct training subsets.
    """
    S = check_subset_matrix(S, min_rows=4)
    y = check_targets(y, len(S))
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    _, group = np.unique(S, axis=0, return_inverse=True)
    group = group.ravel()
    n_groups = int(group.max()) + 1
    n_test = max(2, int(round(holdout * n_groups)))
    if n_groups - n_test < 2:
        raise ValueError(
            f"{n_groups} distinct subsets are too few to hold out {n_test}; sample more (distinct) subsets"
        )
    held_out = np.random.default_rng(seed).permutation(n_groups)[:n_test]
    is_test = np.isin(group, held_out)
    test, train = np.flatnonzero(is_test), np.flatnonzero(~is_test)
    _, scores = _fit_and_score(estimator, S[train], y[train], S[test], y[test])
    return {
        "heldout_lds": scores["lds"],
        "heldout_residual_error": scores["residual_error"],
        "n_train_subsets": int(len(train)),
        "n_heldout_subsets": int(len(test)),
    }
