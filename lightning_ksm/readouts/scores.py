"""Per-task scores and pairwise interactions from any fitted surrogate g(s) (a LinearSurrogate, a
KernelSurrogate, or any scikit-learn regressor fitted on (m, K) 0/1 subsets).

Sign convention (everywhere in lightning-ksm): F and g are losses, lower is better. A task's score is
the predicted increase of the target loss when the task is removed, so **score > 0 means the task
helps** the target and score < 0 means it hurts.

Every readout returns the surrogate's trailing shape: (K,) / (K, K) for a surrogate fitted on 1-D
targets, and (K, T) / (T, K, K) for one fitted on T target columns.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from ..subsets import sample_subsets

__all__ = ["loo_scores", "ensemble_scores", "interaction_matrix", "interaction_case", "INTERACTION_CASES"]

_CHUNK = 16384


# -- helpers ----------------------------------------------------------------------------------
def _n_tasks(surrogate) -> int:
    # Any object with predict() and n_features_in_ works; sklearn sets the latter in fit().
    K = getattr(surrogate, "n_features_in_", None)
    if K is None or not hasattr(surrogate, "predict"):
        raise ValueError(
            f"{type(surrogate).__name__} is not a fitted surrogate (no n_features_in_/predict); "
            "fit it on an (m, K) subset matrix first"
        )
    return int(K)


def _single(surrogate) -> bool:
    return bool(getattr(surrogate, "single_output_", False))


def _predict2d(surrogate, S: np.ndarray) -> np.ndarray:
    """Predictions as (n, T), computed in chunks to bound memory."""
    parts = []
    for start in range(0, len(S), _CHUNK):
        pred = np.asarray(surrogate.predict(S[start : start + _CHUNK]), dtype=np.float64)
        parts.append(pred.reshape(len(pred), -1))
    return np.concatenate(parts, axis=0)


def _target_column(surrogate, target, target_names=None) -> int:
    """Resolve ``target`` (column index, negative allowed, or a name in ``target_names``)."""
    n_out = int(getattr(surrogate, "n_outputs_", 1))
    if target is None:
        return n_out - 1
    if isinstance(target, str):
        if target_names is None or target not in list(target_names):
            known = ", ".join(map(str, target_names)) if target_names is not None else "none given"
            raise ValueError(f"unknown target {target!r}; known targets: {known}")
        return list(target_names).index(target)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target must be a column index or a target name, got {target!r}")
    if not -n_out <= target < n_out:
        raise ValueError(f"target index {target} is out of range for a surrogate with {n_out} target column(s)")
    return int(target) % n_out


def _shape_scores(surrogate, scores2d: np.ndarray) -> np.ndarray:
    return scores2d[:, 0] if _single(surrogate) else scores2d


# -- scores -----------------------------------------------------------------------------------
def loo_scores(surrogate) -> np.ndarray:
    """Leave-one-out scores g(1 - e_k) - g(1): the predicted loss increase when task k is removed.

    Returns (K,) or (K, T). Note that g(1) extrapolates when the surrogate was fitted on small
    subsets; :func:`ensemble_scores` stays on the training distribution.
    """
    K = _n_tasks(surrogate)
    design = np.vstack([np.ones((1, K)), 1.0 - np.eye(K)])
    pred = _predict2d(surrogate, design)
    return _shape_scores(surrogate, pred[1:] - pred[:1])


def ensemble_scores(
    surrogate,
    *,
    n_samples: int = 4000,
    p: float | None = None,
    size: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The paper's random-ensemble scores: mean g over sampled subsets without task k minus with it.

    Subsets are drawn as in :func:`lightning_ksm.sample_subsets`; by default Bernoulli with the
    inclusion rate of the surrogate's own training subsets (clipped to [0.05, 0.95]), so the scores
    average over the region where the surrogate was fitted. Returns (K,) or (K, T).
    """
    S = ensemble_design(surrogate, n_samples=n_samples, p=p, size=size, seed=seed)
    return _shape_scores(surrogate, _ensemble_from(S, _predict2d(surrogate, S.astype(np.float64))))


def ensemble_design(surrogate, *, n_samples: int = 4000, p: float | None = None, size: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """The subsets :func:`ensemble_scores` averages over (Bernoulli with the surrogate's own inclusion
    rate, clipped to [0.05, 0.95], unless ``p`` or ``size`` is given)."""
    K = _n_tasks(surrogate)
    if p is None and size is None:
        p = float(np.clip(getattr(surrogate, "inclusion_rate_", 0.5), 0.05, 0.95))
    return sample_subsets(K, n_samples, p=p, size=size, seed=seed)


def _ensemble_from(S: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(K, T) ensemble scores from the design ``S`` and the predictions ``pred`` (n, T) on it."""
    n_samples = len(S)
    with_k = S.sum(axis=0)
    without_k = n_samples - with_k
    if (with_k == 0).any() or (without_k == 0).any():
        k = int(np.flatnonzero((with_k == 0) | (without_k == 0))[0])
        raise ValueError(
            f"task {k} was {'never' if with_k[k] == 0 else 'always'} sampled; raise n_samples or "
            "move p/size away from the extremes"
        )
    mean_with = (S.T.astype(np.float64) @ pred) / with_k[:, None]
    mean_without = ((~S).T.astype(np.float64) @ pred) / without_k[:, None]
    return mean_without - mean_with


def interaction_matrix(surrogate) -> np.ndarray:
    """Pairwise interactions I_ij = g(1) - g(1-e_i) - g(1-e_j) + g(1-e_i-e_j).

    I_ij = (loss increase from removing both) - (increase from removing i) - (increase from removing j)
    = (effect of i when j is absent) - (effect of i when j is present). **I_ij < 0: each task's effect
    (its score) is larger when the other is present**. What that means depends on the two tasks'
    signs (:func:`interaction_case`): for two helpful tasks it is synergy (> 0: redundancy), for two
    harmful ones redundant harm (> 0: compounding harm), for a helpful and a harmful one masking.
    The diagonal is 0. Returns (K, K) or (T, K, K).
    """
    K = _n_tasks(surrogate)
    out = _interactions_from(K, _predict2d(surrogate, interaction_design(K)))
    return out[0] if _single(surrogate) else out


def interaction_design(K: int) -> np.ndarray:
    """The subsets the interactions are read from: all tasks, all but one, all but a pair (i < j)."""
    pairs = list(combinations(range(K), 2))
    design = np.ones((1 + K + len(pairs), K))
    design[1 + np.arange(K), np.arange(K)] = 0.0
    rows = np.arange(len(pairs))
    ii = np.array([p[0] for p in pairs], dtype=int)
    jj = np.array([p[1] for p in pairs], dtype=int)
    design[1 + K + rows, ii] = 0.0
    design[1 + K + rows, jj] = 0.0
    return design


def _interactions_from(K: int, pred: np.ndarray) -> np.ndarray:
    """(T, K, K) interactions from predictions (rows of :func:`interaction_design`, T columns)."""
    ii, jj = np.triu_indices(K, k=1)
    full, single, pair = pred[0], pred[1 : 1 + K], pred[1 + K :]
    T = pred.shape[1]
    out = np.zeros((T, K, K))
    vals = full[None, :] - single[ii] - single[jj] + pair  # (n_pairs, T)
    out[:, ii, jj] = vals.T
    out[:, jj, ii] = vals.T
    return out


# What an interaction means depends on whether the two tasks help or hurt (their scores' signs).
# I_ij = (effect of i when j is absent) - (effect of i when j is present), with effect = the loss
# increase when i is removed; so I_ij < 0 always means "each task's effect is larger (more positive)
# when the other is present".
INTERACTION_CASES = {
    ("helps", "neg"): ("synergy", "both help, and each helps more when the other is present"),
    ("helps", "pos"): ("redundancy", "both help, but either one alone gives most of the benefit"),
    ("hurts", "pos"): ("compounding harm", "both hurt, and each hurts more when the other is present"),
    ("hurts", "neg"): ("redundant harm", "both hurt, but either one alone does most of the harm"),
    ("mixed", "neg"): ("masking", "the helpful task hides part of the harmful one's harm"),
    ("mixed", "pos"): ("masking", "the harmful task hides part of the helpful one's benefit"),
}


def interaction_case(score_i: float, score_j: float, value: float) -> tuple:
    """``(label, sentence)`` for an interaction ``value`` of two tasks with scores ``score_i`` and
    ``score_j`` (> 0: helps): synergy / redundancy (both help), compounding / redundant harm (both
    hurt), masking (one helps, one hurts). ``("none", ...)`` for 0 or non-finite values."""
    if not (np.isfinite(value) and np.isfinite(score_i) and np.isfinite(score_j)) or value == 0:
        return ("none", "no interaction")
    if score_i >= 0 and score_j >= 0:
        kind = "helps"
    elif score_i < 0 and score_j < 0:
        kind = "hurts"
    else:
        kind = "mixed"
    return INTERACTION_CASES[(kind, "neg" if value < 0 else "pos")]


