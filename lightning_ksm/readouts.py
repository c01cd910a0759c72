"""Attribution readouts from any fitted surrogate g(s) (a LinearSurrogate, a KernelSurrogate, or any
scikit-learn regressor fitted on (m, K) 0/1 subsets).

Sign convention (everywhere in lightning-ksm): F and g are losses, lower is better. A task's score is
the predicted increase of the target loss when the task is removed, so **score > 0 means the task
helps** the target and score < 0 means it hurts.

Every readout returns the surrogate's trailing shape: (K,) / (K, K) for a surrogate fitted on 1-D
targets, and (K, T) / (T, K, K) for one fitted on T target columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np

from .subsets import sample_subsets

__all__ = [
    "loo_scores",
    "ensemble_scores",
    "interaction_matrix",
    "best_subset",
    "BestSubset",
    "task_affinity",
    "cotraining_groups",
    "CoTrainingGroup",
]

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
    K = _n_tasks(surrogate)
    if p is None and size is None:
        p = float(np.clip(getattr(surrogate, "inclusion_rate_", 0.5), 0.05, 0.95))
    S = sample_subsets(K, n_samples, p=p, size=size, seed=seed)
    pred = _predict2d(surrogate, S.astype(np.float64))
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
    return _shape_scores(surrogate, mean_without - mean_with)


def interaction_matrix(surrogate) -> np.ndarray:
    """Pairwise interactions I_ij = g(1) - g(1-e_i) - g(1-e_j) + g(1-e_i-e_j).

    I_ij = (loss increase from removing both) - (increase from removing i) - (increase from removing j).
    With losses, **I_ij < 0 means synergy**: the tasks help more together than the sum of their
    separate effects (each one's benefit is larger when the other is present; e.g. a target that needs
    both). **I_ij > 0 means redundancy or antagonism**: either one alone gives most of the benefit,
    or they interfere. The diagonal is 0. Returns (K, K) or (T, K, K).
    """
    K = _n_tasks(surrogate)
    pairs = list(combinations(range(K), 2))
    design = np.ones((1 + K + len(pairs), K))
    design[1 + np.arange(K), np.arange(K)] = 0.0
    rows = np.arange(len(pairs))
    ii = np.array([p[0] for p in pairs], dtype=int)
    jj = np.array([p[1] for p in pairs], dtype=int)
    design[1 + K + rows, ii] = 0.0
    design[1 + K + rows, jj] = 0.0
    pred = _predict2d(surrogate, design)
    full, single, pair = pred[0], pred[1 : 1 + K], pred[1 + K :]
    T = pred.shape[1]
    out = np.zeros((T, K, K))
    vals = full[None, :] - single[ii] - single[jj] + pair  # (n_pairs, T)
    out[:, ii, jj] = vals.T
    out[:, jj, ii] = vals.T
    return out[0] if _single(surrogate) else out


# -- best subsets -----------------------------------------------------------------------------
@dataclass
class BestSubset:
    """The subset with the lowest predicted target loss found by :func:`best_subset`."""

    mask: np.ndarray
    predicted_loss: float
    exact: bool
    target: int
    n_evaluated: int

    @property
    def tasks(self) -> list[int]:
        """Indices of the tasks in the subset."""
        return [int(i) for i in np.flatnonzero(self.mask)]


def _enumerate(K: int, size: int | None):
    if size is None:
        for r in range(1, K + 1):
            yield from combinations(range(K), r)
    else:
        yield from combinations(range(K), size)


def best_subset(
    surrogate,
    *,
    size: int | None = None,
    target=None,
    target_names=None,
    max_exact: int = 50_000,
    n_restarts: int = 4,
    seed: int = 0,
) -> BestSubset:
    """Find the task subset that minimizes the surrogate's predicted target loss.

    Args:
        surrogate: a fitted surrogate.
        size: exact number of tasks, or None for any non-empty size.
        target: target column (index, negative allowed, or a name in ``target_names``); default the
            last column (by convention "all").
        target_names: names of the target columns, to allow ``target`` by name.
        max_exact: enumerate all candidates when there are at most this many; otherwise run greedy
            forward selection followed by swap (and, without ``size``, add/drop) local search, from
            the greedy start and ``n_restarts`` seeded random starts.
        n_restarts: random restarts of the local search (inexact mode only).
        seed: seed of the random restarts.
    """
    K = _n_tasks(surrogate)
    col = _target_column(surrogate, target, target_names)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= K:
            raise ValueError(f"size must be an integer between 1 and the number of tasks ({K}), got {size!r}")
        n_candidates = comb(K, int(size))
    else:
        n_candidates = 2**K - 1

    def loss(masks: np.ndarray) -> np.ndarray:
        return _predict2d(surrogate, masks.astype(np.float64))[:, col]

    if n_candidates <= max_exact:
        best_val, best_mask = np.inf, None
        it = _enumerate(K, size)
        while True:
            chunk = [c for _, c in zip(range(_CHUNK), it)]
            if not chunk:
                break
            masks = np.zeros((len(chunk), K), dtype=bool)
            for r, c in enumerate(chunk):
                masks[r, list(c)] = True
            vals = loss(masks)
            i = int(np.argmin(vals))
            if vals[i] < best_val:
                best_val, best_mask = float(vals[i]), masks[i].copy()
        return BestSubset(best_mask, best_val, True, col, n_candidates)

    rng = np.random.default_rng(seed)
    n_eval = 0

    def local_search(mask: np.ndarray):
        nonlocal n_eval
        current = float(loss(mask[None])[0])
        n_eval += 1
        while True:
            moves = _neighbours(mask, allow_resize=size is None)
            if len(moves) == 0:
                return mask, current
            vals = loss(moves)
            n_eval += len(moves)
            i = int(np.argmin(vals))
            if vals[i] >= current - 1e-12 * max(1.0, abs(current)):
                return mask, current
            mask, current = moves[i], float(vals[i])

    starts = [_greedy(loss, K, size)]
    target_size = size
    for _ in range(n_restarts):
        r = target_size if target_size is not None else int(rng.integers(1, K + 1))
        m = np.zeros(K, dtype=bool)
        m[rng.choice(K, size=r, replace=False)] = True
        starts.append(m)
    best_val, best_mask = np.inf, None
    for start in starts:
        mask, val = local_search(start)
        if val < best_val:
            best_val, best_mask = val, mask
    return BestSubset(best_mask, best_val, False, col, n_eval)


def _greedy(loss, K: int, size: int | None) -> np.ndarray:
    """Forward selection: add the task that lowers the predicted loss most, up to ``size`` tasks
    (or until nothing helps when ``size`` is None)."""
    mask = np.zeros(K, dtype=bool)
    current = np.inf
    while mask.sum() < (size if size is not None else K):
        out = np.flatnonzero(~mask)
        cand = np.repeat(mask[None], len(out), axis=0)
        cand[np.arange(len(out)), out] = True
        vals = loss(cand)
        i = int(np.argmin(vals))
        if size is None and vals[i] >= current:
            break
        mask, current = cand[i], float(vals[i])
    return mask


def _neighbours(mask: np.ndarray, *, allow_resize: bool) -> np.ndarray:
    """All swaps (one task in, one out) and, with ``allow_resize``, single additions and removals."""
    inside, outside = np.flatnonzero(mask), np.flatnonzero(~mask)
    moves = []
    if len(inside) and len(outside):
        swaps = np.repeat(mask[None], len(inside) * len(outside), axis=0)
        ii, oo = np.meshgrid(inside, outside, indexing="ij")
        rows = np.arange(swaps.shape[0])
        swaps[rows, ii.ravel()] = False
        swaps[rows, oo.ravel()] = True
        moves.append(swaps)
    if allow_resize:
        if len(outside):
            add = np.repeat(mask[None], len(outside), axis=0)
            add[np.arange(len(outside)), outside] = True
            moves.append(add)
        if len(inside) > 1:
            drop = np.repeat(mask[None], len(inside), axis=0)
            drop[np.arange(len(inside)), inside] = False
            moves.append(drop)
    return np.concatenate(moves) if moves else np.zeros((0, len(mask)), dtype=bool)


# -- co-training groups -----------------------------------------------------------------------
@dataclass
class CoTrainingGroup:
    """A recommended group of tasks to train together.

    Attributes:
        tasks: task indices in the group.
        predicted_loss: mean over the group's tasks of the predicted loss on that task's own target
            when training on the group only.
        member_losses: per task in ``tasks``, its predicted target loss when training on the group.
        all_tasks_loss: mean over the same tasks of the predicted loss when training on all tasks.
    """

    tasks: list
    predicted_loss: float
    member_losses: list = field(default_factory=list)
    all_tasks_loss: float = float("nan")


def task_affinity(task_scores: np.ndarray) -> np.ndarray:
    """A symmetric, positive affinity matrix from a square (K, K) score matrix (source i on target j).

    Mutual help (both directions positive) gives a high affinity and mutual harm a low one:
    A_ij = exp(((S_ij + S_ji) / 2) / scale) with scale the mean absolute off-diagonal score. The
    diagonal (a task's effect on itself) says nothing about grouping and is set to 1.
    """
    S = np.asarray(task_scores, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"task_scores must be a square (K, K) matrix, got shape {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("task_scores contains non-finite values")
    sym = (S + S.T) / 2.0
    off = ~np.eye(len(S), dtype=bool)
    scale = np.abs(sym[off]).mean() if off.any() else 1.0
    if scale == 0:
        scale = 1.0
    A = np.exp(np.clip(sym / scale, -30, 30))
    np.fill_diagonal(A, 1.0)
    return A


def cotraining_groups(
    surrogate,
    n_groups: int,
    *,
    target_columns,
    method: str = "ensemble",
    seed: int = 0,
    ensemble_samples: int = 4000,
) -> list[CoTrainingGroup]:
    """Partition the K tasks into ``n_groups`` groups of tasks that help each other.

    Each task must be both a source (a surrogate input) and a target (a surrogate output column):
    ``target_columns[k]`` is the column of task k's own target loss. The task-by-task score matrix
    (``method`` "ensemble" or "loo") is turned into an affinity (:func:`task_affinity`) and split by
    scikit-learn's spectral clustering (seeded). Groups are returned with their predicted losses,
    best (lowest) first.
    """
    K = _n_tasks(surrogate)
    cols = np.asarray(target_columns)
    n_out = int(getattr(surrogate, "n_outputs_", 1))
    if cols.shape != (K,):
        raise ValueError(f"target_columns must give one target column per task ({K}), got shape {cols.shape}")
    if cols.dtype.kind not in "iu" or (cols < 0).any() or (cols >= n_out).any():
        raise ValueError(f"target_columns must be column indices in [0, {n_out}), got {cols.tolist()}")
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or not 1 <= n_groups <= K:
        raise ValueError(f"n_groups must be an integer between 1 and the number of tasks ({K}), got {n_groups!r}")
    if method == "ensemble":
        scores = ensemble_scores(surrogate, n_samples=ensemble_samples, seed=seed)
    elif method == "loo":
        scores = loo_scores(surrogate)
    else:
        raise ValueError(f"method must be 'ensemble' or 'loo', got {method!r}")
    scores = np.asarray(scores).reshape(K, -1)[:, cols]

    if n_groups == 1:
        labels = np.zeros(K, dtype=int)
    elif n_groups == K:
        labels = np.arange(K)
    else:
        from sklearn.cluster import SpectralClustering

        labels = SpectralClustering(
            n_clusters=n_groups, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
        ).fit_predict(task_affinity(scores))

    masks = np.zeros((n_groups, K), dtype=bool)
    masks[labels, np.arange(K)] = True
    masks = masks[masks.any(axis=1)]
    pred = _predict2d(surrogate, np.vstack([np.ones((1, K)), masks.astype(np.float64)]))
    full, per_group = pred[0], pred[1:]
    groups = []
    for g, mask in enumerate(masks):
        members = np.flatnonzero(mask)
        member_losses = per_group[g, cols[members]]
        groups.append(
            CoTrainingGroup(
                tasks=[int(t) for t in members],
                predicted_loss=float(member_losses.mean()),
                member_losses=[float(v) for v in member_losses],
                all_tasks_loss=float(full[cols[members]].mean()),
            )
        )
    groups.sort(key=lambda grp: grp.predicted_loss)
    return groups
