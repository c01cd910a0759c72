"""Co-training groups chosen by predicted group outcomes (TAG-style selection).

A grouping is at most ``n`` training mixtures (groups); a group may share tasks with another. Each
source task is *served* by the group, among those that contain it, where its own target loss is
lowest; each extra target (a validation group that is not a source task, e.g. the target the user
cares about) is served by the best group overall. The grouping's value is the mean served loss over
all these targets (the extra targets together weigh as much as the tasks' own targets), lower is
better; every task must be in some group. This is the selection of
Fifty et al. (2021, "Efficiently identifying task groupings", TAG), with the surrogate's predicted
group losses in place of lookahead affinities.

The search is exhaustive when the number of groupings of the supported candidate groups is at most
``max_exact`` (small K) and otherwise a local search (add / remove / move one task between groups)
from the spectral clustering of the score affinity, from the best single group, and from seeded
random partitions. :func:`select_groups` takes any group-loss function, so the benchmark's
baselines (gradient cosine and TAG lookahead affinities) run through the same search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np

from .scores import _n_tasks, _predict2d, ensemble_scores, loo_scores
from .support import Support, support_of

__all__ = ["task_affinity", "cotraining_groups", "CoTrainingGroup", "select_groups", "GroupSelection"]

_BIG = 1e30


@dataclass
class CoTrainingGroup:
    """A recommended group of tasks to train together.

    Attributes:
        tasks: task indices in the group.
        predicted_loss: mean predicted loss over the targets this group serves.
        member_losses: per task in ``tasks``, its predicted own-target loss when training on the group.
        all_tasks_loss: mean over the served targets of the predicted loss when training on all tasks.
        serves: the target columns this group serves (its tasks' own targets where it is their best
            group, and extra targets).
        served_losses: the predicted loss per served target column.
    """

    tasks: list
    predicted_loss: float
    member_losses: list = field(default_factory=list)
    all_tasks_loss: float = float("nan")
    serves: list = field(default_factory=list)
    served_losses: list = field(default_factory=list)


@dataclass
class GroupSelection:
    """The result of :func:`select_groups`: ``masks`` (n, K), the grouping's ``value`` (mean served
    loss), ``serving[t]`` = the group index serving target ``t``, ``losses`` (n, n_targets)."""

    masks: np.ndarray
    value: float
    serving: np.ndarray
    losses: np.ndarray
    exact: bool
    n_evaluated: int


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


def _served(L: np.ndarray, masks: np.ndarray, K: int):
    """Per target the lowest loss over the groups allowed to serve it (source task t: groups that
    contain t; extra targets: any group). ``L`` (G, K + E) losses; returns (values, group index)."""
    allowed = np.ones_like(L, dtype=bool)
    allowed[:, :K] = masks
    Lm = np.where(allowed, L, np.inf)
    idx = np.argmin(Lm, axis=0)
    return Lm[idx, np.arange(L.shape[1])], idx


def select_groups(
    group_losses,
    K: int,
    n_groups: int,
    *,
    valid=None,
    starts=(),
    max_exact: int = 2_000_000,
    n_restarts: int = 4,
    seed: int = 0,
    weights=None,
) -> GroupSelection:
    """At most ``n_groups`` groups minimizing the mean served loss (see the module docstring).

    Args:
        group_losses: ``f(masks (G, K) bool) -> (G, K + E)`` losses; column t < K is source task
            t's own target, the E further columns are extra targets.
        K: number of tasks.
        n_groups: the most groups to use (fewer when a group would serve nothing).
        valid: ``f(masks) -> bool (G,)``, the groups allowed (e.g. inside the surrogate's support);
            default all.
        starts: groupings (lists of masks or (n, K) arrays) to start the local search from.
        max_exact: enumerate all groupings of the valid candidate groups when there are at most this
            many (only for K <= 16); otherwise local search.
        weights: per target column (K + E), the weight of its served loss in the mean; default equal.
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or not 1 <= n_groups <= K:
        raise ValueError(f"n_groups must be an integer between 1 and the number of tasks ({K}), got {n_groups!r}")
    n = int(n_groups)
    valid = valid or (lambda m: np.ones(len(m), dtype=bool))

    def losses(masks):
        L = np.asarray(group_losses(masks), dtype=np.float64).reshape(len(masks), -1)
        bad = ~valid(masks)
        L[bad] = _BIG
        return np.where(np.isfinite(L), L, _BIG)

    w = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    if K <= 16:
        pool = np.array([[(c >> k) & 1 for k in range(K)] for c in range(1, 2**K)], dtype=bool)
        pool = pool[valid(pool)]
        if len(pool) and comb(len(pool), min(n, len(pool))) <= max_exact:
            return _exhaustive(losses(pool), pool, K, min(n, len(pool)), w)
    return _local(losses, K, n, starts, n_restarts, seed, valid, w)


def _mean(vals: np.ndarray, w) -> np.ndarray:
    """Mean over the last axis, weighted by ``w`` (normalized) when given."""
    return vals.mean(axis=-1) if w is None else (vals * w).sum(axis=-1)


def _exhaustive(Lpool: np.ndarray, pool: np.ndarray, K: int, n: int, w=None) -> GroupSelection:
    allowed = np.ones_like(Lpool, dtype=bool)
    allowed[:, :K] = pool
    Lm = np.where(allowed, Lpool, np.inf)
    best_val, best_idx, count = np.inf, None, 0
    it = combinations(range(len(pool)), n)
    while True:
        chunk = np.array([c for _, c in zip(range(65536), it)], dtype=np.int64)
        if len(chunk) == 0:
            break
        vals = _mean(Lm[chunk].min(axis=1), w)
        count += len(chunk)
        i = int(np.argmin(vals))
        if vals[i] < best_val:
            best_val, best_idx = float(vals[i]), chunk[i]
    masks = pool[best_idx]
    return _finish(masks, Lpool[best_idx], K, True, count, w)


def _finish(masks, L, K, exact, count, w=None) -> GroupSelection:
    vals, idx = _served(L, masks, K)
    used = np.unique(idx)
    masks, L = masks[used], L[used]
    vals, idx = _served(L, masks, K)
    return GroupSelection(masks, float(_mean(vals, w)), idx, L, exact, int(count))


def _local(losses, K, n, starts, n_restarts, seed, valid, w=None) -> GroupSelection:
    rng = np.random.default_rng(seed)
    inits = [np.asarray(s, dtype=bool).reshape(-1, K) for s in starts]
    for _ in range(n_restarts):
        labels = rng.permutation(np.arange(K) % n)
        inits.append(np.eye(n, dtype=bool)[labels].T)
    best, count = None, 0
    for init in inits:
        masks = init[init.any(axis=1)]
        if len(masks) < n:  # pad with copies of the all-tasks group, which the search reshapes
            masks = np.vstack([masks, np.ones((n - len(masks), K), dtype=bool)])
        masks = masks[:n].copy()
        L = losses(masks)
        count += len(masks)
        value = _mean(_served(L, masks, K)[0], w)
        while True:
            moves, which = _group_moves(masks)
            if len(moves) == 0:
                break
            Lnew = losses(moves)
            count += len(moves)
            vals = np.empty(len(moves))
            for r in range(len(moves)):
                g = which[r]
                trial_m, trial_L = masks.copy(), L.copy()
                trial_m[g], trial_L[g] = moves[r], Lnew[r]
                if not trial_m.any(axis=0).all():
                    vals[r] = np.inf
                    continue
                vals[r] = _mean(_served(trial_L, trial_m, K)[0], w)
            r = int(np.argmin(vals))
            if not vals[r] < value - 1e-12 * max(1.0, abs(value)):
                break
            masks[which[r]], L[which[r]], value = moves[r], Lnew[r], vals[r]
        if best is None or value < best[0]:
            best = (value, masks.copy(), L.copy())
    return _finish(best[1], best[2], K, False, count, w)


def _group_moves(masks: np.ndarray):
    """Every group with one task added or removed (a group keeps at least one task)."""
    n, K = masks.shape
    moves, which = [], []
    for g in range(n):
        flips = np.repeat(masks[g][None], K, axis=0)
        flips[np.arange(K), np.arange(K)] ^= True
        keep = flips.any(axis=1)
        moves.append(flips[keep])
        which += [g] * int(keep.sum())
    return np.concatenate(moves), np.array(which, dtype=int)


def cotraining_groups(
    surrogate,
    n_groups: int,
    *,
    target_columns,
    extra_columns=(),
    method: str = "ensemble",
    seed: int = 0,
    ensemble_samples: int = 4000,
    support: str | Support = "distance",
    radius: int | None = None,
    lower_bound: float | None = None,
    max_exact: int = 2_000_000,
) -> list[CoTrainingGroup]:
    """At most ``n_groups`` groups of tasks to train together, chosen by the surrogate's predicted
    group losses (TAG-style; see the module docstring).

    ``target_columns[k]`` is the column of task k's own target loss; ``extra_columns`` are further
    target columns served by any group (the targets the user cares about); together they weigh as
    much as all the tasks' own targets (a grouping that serves the tasks but not the target the
    report leads with would contradict it). Groups are searched
    inside the surrogate's support (``support``, ``radius``: see :mod:`.support`); a prediction below
    ``lower_bound`` counts as invalid. The spectral clustering of the ``method`` ("ensemble" or
    "loo") score affinity is one start of the local search. Groups are returned best first.
    """
    K = _n_tasks(surrogate)
    cols = np.asarray(target_columns)
    n_out = int(getattr(surrogate, "n_outputs_", 1))
    extra = np.asarray(list(extra_columns), dtype=np.int64)
    if cols.shape != (K,):
        raise ValueError(f"target_columns must give one target column per task ({K}), got shape {cols.shape}")
    if cols.dtype.kind not in "iu" or (cols < 0).any() or (cols >= n_out).any():
        raise ValueError(f"target_columns must be column indices in [0, {n_out}), got {cols.tolist()}")
    if ((extra < 0) | (extra >= n_out)).any():
        raise ValueError(f"extra_columns must be column indices in [0, {n_out}), got {extra.tolist()}")
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or not 1 <= n_groups <= K:
        raise ValueError(f"n_groups must be an integer between 1 and the number of tasks ({K}), got {n_groups!r}")
    if method not in ("ensemble", "loo"):
        raise ValueError(f"method must be 'ensemble' or 'loo', got {method!r}")
    sup = support if isinstance(support, Support) else (
        Support(np.ones((1, K), bool), "none") if support == "none" else support_of(surrogate, support, radius))
    all_cols = np.concatenate([cols, extra])
    floor = -np.inf if lower_bound is None else float(lower_bound)

    def group_losses(masks):
        pred = _predict2d(surrogate, masks.astype(np.float64))[:, all_cols]
        return np.where(pred < floor, np.inf, pred)

    starts = [np.ones((1, K), dtype=bool)]
    if 1 < n_groups < K:
        scores = ensemble_scores(surrogate, n_samples=ensemble_samples, seed=seed) if method == "ensemble" \
            else loo_scores(surrogate)
        scores = np.asarray(scores).reshape(K, -1)[:, cols]
        from sklearn.cluster import SpectralClustering

        labels = SpectralClustering(
            n_clusters=n_groups, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
        ).fit_predict(task_affinity(scores))
        starts.append(np.eye(n_groups, dtype=bool)[labels].T)
    weights = np.concatenate([np.ones(K), np.full(len(extra), K / len(extra))]) if len(extra) else None
    sel = select_groups(group_losses, K, int(n_groups), valid=sup.contains, starts=starts,
                        max_exact=max_exact, seed=seed, weights=weights)
    full = _predict2d(surrogate, np.ones((1, K)))[0, all_cols]
    groups = []
    for g, mask in enumerate(sel.masks):
        members = np.flatnonzero(mask)
        served = np.flatnonzero(sel.serving == g)
        member_losses = _predict2d(surrogate, mask[None].astype(np.float64))[0, cols[members]]
        groups.append(CoTrainingGroup(
            tasks=[int(t) for t in members],
            predicted_loss=float(sel.losses[g, served].mean()) if len(served) else float("nan"),
            member_losses=[float(v) for v in member_losses],
            all_tasks_loss=float(full[served].mean()) if len(served) else float("nan"),
            serves=[int(all_cols[s]) for s in served],
            served_losses=[float(sel.losses[g, s]) for s in served],
        ))
    groups.sort(key=lambda grp: (np.isnan(grp.predicted_loss), grp.predicted_loss))
    return groups
