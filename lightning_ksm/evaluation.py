"""Fit quality of a surrogate on subsets it did not see."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

from ._validation import check_subset_matrix, check_targets
from .metrics import lds, residual_error

__all__ = ["holdout_quality"]


def holdout_quality(estimator, S, y, *, holdout: float = 0.2, seed: int = 0) -> dict:
    """Fit a clone of ``estimator`` on part of (S, y) and score it on the held-out rest.

    Returns a dict with the held-out LDS, residual error and the split sizes. The estimator itself
    is not modified. Needs at least 2 held-out and 2 training subsets.
    """
    S = check_subset_matrix(S, min_rows=4)
    y = check_targets(y, len(S))
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    m = len(S)
    n_test = max(2, int(round(holdout * m)))
    if m - n_test < 2:
        raise ValueError(f"{m} subsets are too few to hold out {n_test}; sample more subsets")
    order = np.random.default_rng(seed).permutation(m)
    test, train = order[:n_test], order[n_test:]
    model = clone(estimator).fit(S[train], y[train])
    pred = model.predict(S[test])
    return {
        "heldout_lds": lds(y[test], pred),
        "heldout_residual_error": residual_error(y[test], pred),
        "n_train_subsets": int(len(train)),
        "n_heldout_subsets": int(len(test)),
    }
