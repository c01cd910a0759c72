"""Fit quality of a surrogate on subsets it did not see."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

from ._validation import check_subset_matrix, check_targets
from .metrics import lds, residual_error

__all__ = ["holdout_quality"]


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
    model = clone(estimator).fit(S[train], y[train])
    pred = model.predict(S[test])
    return {
        "heldout_lds": lds(y[test], pred),
        "heldout_residual_error": residual_error(y[test], pred),
        "n_train_subsets": int(len(train)),
        "n_heldout_subsets": int(len(test)),
    }
