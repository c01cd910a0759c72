"""Best task subsets: the subset with the lowest predicted target loss, searched only where the
surrogate has evidence (:mod:`.support`) and never at a prediction the loss cannot take.

:func:`best_subset` returns the best supported subset, its runners-up (``candidates``, so that the
caller can re-score them with GradEx or real training) and, when an unconstrained search finds a
lower prediction outside the support, that subset too (``outside``), so the report can say that the
search wanted to leave the evidence (it is never recommended).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np

from .moves import MoveScorer
from .scores import _CHUNK, _n_tasks, _predict2d, _target_column
from .support import Support, support_of

__all__ = ["best_subset", "BestSubset"]


@dataclass
class BestSubset:
    """The subset with the lowest predicted target loss found by :func:`best_subset`.

    Attributes:
        mask, predicted_loss: the recommendation (inside the support, at a possible loss).
        exact: every candidate was scored (else a local search).
        target: the target column.
        n_evaluated: candidates scored.
        candidates: the best ``top`` valid subsets as ``(mask, predicted_loss)``, best first (the
            recommendation is the first).
        outside: ``(mask, predicted_loss)`` of a lower prediction found outside the support or below
            ``lower_bound``, or None. Never a recommendation; only a warning.
        support: the support's description.
    """

    mask: np.ndarray
    predicted_loss: float
    exact: bool
    target: int
    n_evaluated: int
    candidates: list = field(default_factory=list)
    outside: tuple | None = None
    support: dict = field(default_factory=dict)

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


class _Top:
    """The ``n`` lowest (value, mask) pairs seen, distinct masks."""

    def __init__(self, n: int):
        self.n, self.items = n, {}

    def add(self, masks: np.ndarray, vals: np.ndarray) -> None:
        if len(vals) == 0:
            return
        order = np.argsort(vals, kind="stable")[: self.n]
        for i in order:
            key = masks[i].tobytes()
            if key not in self.items or vals[i] < self.items[key][0]:
                self.items[key] = (float(vals[i]), masks[i].copy())
        if len(self.items) > 4 * self.n:
            self._trim()

    def _trim(self) -> None:
        keep = sorted(self.items.items(), key=lambda kv: kv[1][0])[: self.n]
        self.items = dict(keep)

    def best(self) -> list:
        self._trim()
        return [(m, v) for v, m in sorted(self.items.values(), key=lambda vm: vm[0])]


def best_subset(
    surrogate,
    *,
    size: int | None = None,
    target=None,
    target_names=None,
    max_exact: int = 50_000,
    n_restarts: int = 4,
    seed: int = 0,
    support: str | Support = "distance",
    radius: int | None = None,
    lower_bound: float | None = None,
    top: int = 5,
) -> BestSubset:
    """Find the task subset that minimizes the surrogate's predicted target loss, inside its support.

    Args:
        surrogate: a fitted surrogate.
        size: exact number of tasks, or None for any non-empty size.
        target: target column (index, negative allowed, or a name in ``target_names``); default the
            last column (by convention "all").
        target_names: names of the target columns, to allow ``target`` by name.
        max_exact: enumerate all candidates when there are at most this many; otherwise run greedy
            forward selection followed by swap (and, without ``size``, add/drop) local search, from
            the greedy start, the best training subset and ``n_restarts`` seeded random starts.
        n_restarts: random restarts of the local search (inexact mode only).
        seed: seed of the random restarts.
        support: "distance" (default), "size", "none", or a :class:`Support`; see :mod:`.support`.
        radius: the distance limit for ``support="distance"`` (default: from the training subsets).
        lower_bound: the lowest loss possible (0 for cross-entropy); predictions below it are never
            recommended.
        top: how many of the best valid subsets to return in ``candidates``.

    Raises ValueError when no candidate is valid (e.g. ``size`` outside the support's sizes).
    """
    K = _n_tasks(surrogate)
    col = _target_column(surrogate, target, target_names)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= K:
            raise ValueError(f"size must be an integer between 1 and the number of tasks ({K}), got {size!r}")
        n_candidates = comb(K, int(size))
    else:
        n_candidates = 2**K - 1
    sup = support if isinstance(support, Support) else (
        Support(np.ones((1, K), bool), "none") if support == "none" else support_of(surrogate, support, radius))
    floor = -np.inf if lower_bound is None else float(lower_bound)
    described = sup.describe()
    if size is not None and not sup.min_size <= size <= sup.max_size and sup.mode != "none":
        # An explicitly requested size outside the fitted sizes: the user asked for it, so the size
        # range is relaxed to it; the distance limit (mode "distance") still applies.
        sup = Support(sup.X, sup.mode, sup.radius)
        sup.min_size, sup.max_size = min(sup.min_size, int(size)), max(sup.max_size, int(size))
        described = dict(described, requested_size_outside_range=True)

    def raw(masks: np.ndarray) -> np.ndarray:
        return _predict2d(surrogate, masks.astype(np.float64))[:, col]

    def valid(masks: np.ndarray, vals: np.ndarray) -> np.ndarray:
        return sup.contains(masks) & (vals >= floor)

    good, anywhere = _Top(max(1, int(top))), _Top(1)
    n_eval = 0
    exact = n_candidates <= max_exact
    if exact:
        it = _enumerate(K, size)
        while True:
            chunk = [c for _, c in zip(range(_CHUNK), it)]
            if not chunk:
                break
            masks = np.zeros((len(chunk), K), dtype=bool)
            for r, c in enumerate(chunk):
                masks[r, list(c)] = True
            vals = raw(masks)
            ok = valid(masks, vals)
            good.add(masks[ok], vals[ok])
            anywhere.add(masks, vals)
        n_eval = n_candidates
    elif MoveScorer.applies(surrogate):  # the same search, moves scored incrementally (moves.py)
        rng = np.random.default_rng(seed)
        scorer = MoveScorer(surrogate, col, sup)
        starts = _starts(_greedy_fast(scorer, K, size, floor, good, anywhere), raw, sup, K, size, n_restarts, rng)
        for start in starts:
            n_eval += _search_fast(scorer, start, allow_resize=size is None, floor=floor, good=good, anywhere=anywhere)
        n_eval += _search_fast(scorer, _greedy_fast(scorer, K, size, floor, None, None), allow_resize=size is None,
                               floor=floor, good=None, anywhere=anywhere)
    else:
        rng = np.random.default_rng(seed)

        def penalised(masks):
            vals = raw(masks)
            ok = valid(masks, vals)
            good.add(masks[ok], vals[ok])
            anywhere.add(masks, vals)
            return np.where(ok, vals, np.inf), vals

        starts = _starts(_greedy(lambda m: penalised(m)[0], K, size), raw, sup, K, size, n_restarts, rng)
        for start in starts:
            n_eval += _local_search(penalised, start, allow_resize=size is None)
        # the unconstrained optimum, only to tell whether the search wanted to leave the support
        n_eval += _local_search(lambda m: (raw(m), None), _greedy(raw, K, size), allow_resize=size is None,
                                record=anywhere)
    found = good.best()
    if not found:
        raise ValueError(
            f"no subset{'' if size is None else f' of {size} tasks'} inside the surrogate's support "
            f"({sup.describe()}) has a possible predicted loss; choose another size or support='none'"
        )
    mask, val = found[0]
    outside = None
    best_any = anywhere.best()
    if best_any and best_any[0][1] < val and not np.array_equal(best_any[0][0], mask):
        outside = (best_any[0][0], float(best_any[0][1]))
    return BestSubset(mask, float(val), exact, col, int(n_eval), [(m, float(v)) for m, v in found], outside,
                      described)


def _starts(greedy_start, raw, sup: Support, K: int, size, n_restarts: int, rng) -> list:
    """The local search's starting subsets: the greedy one, the best training subset (of the
    requested size), and ``n_restarts`` seeded random ones inside the support's size range."""
    starts = [greedy_start]
    train = sup.X if size is None else sup.X[sup.X.sum(axis=1) == size]
    if len(train):
        starts.append(train[int(np.argmin(raw(train)))])
    for _ in range(n_restarts):
        r = size if size is not None else int(rng.integers(sup.min_size, sup.max_size + 1))
        m = np.zeros(K, dtype=bool)
        m[rng.choice(K, size=r, replace=False)] = True
        starts.append(m)
    return starts


def _record(top, values: np.ndarray, build) -> None:
    """Add the ``top.n`` lowest finite values (and their masks, built only for those) to ``top``."""
    idx = np.flatnonzero(np.isfinite(values))
    if len(idx) > top.n:
        idx = idx[np.argpartition(values[idx], top.n - 1)[: top.n]]
    if len(idx):
        top.add(build(idx), values[idx])


def _search_fast(scorer: MoveScorer, mask: np.ndarray, *, allow_resize: bool, floor: float, good, anywhere) -> int:
    """:func:`_local_search` with moves scored by ``scorer``; ``good`` None: unconstrained (the
    support and the floor are ignored), else the valid moves are recorded in ``good``."""
    constrained = good is not None
    current = scorer.value(mask)
    anywhere.add(mask[None], np.array([current]))
    if constrained:
        if scorer.support.contains(mask[None])[0] and current >= floor:
            good.add(mask[None], np.array([current]))
        else:
            current = np.inf
    n_eval = 1
    while True:
        vals, oks, build = scorer.moves(mask, allow_resize=allow_resize, check=constrained)
        if len(vals) == 0:
            return n_eval
        n_eval += len(vals)
        _record(anywhere, vals, build)
        if constrained:
            vals = np.where(oks & (vals >= floor), vals, np.inf)
            _record(good, vals, build)
        i = int(np.argmin(vals))
        if not np.isfinite(vals[i]) or vals[i] >= current - 1e-12 * max(1.0, abs(current) if np.isfinite(current) else 1.0):
            return n_eval
        mask, current = build([i])[0], float(vals[i])


def _greedy_fast(scorer: MoveScorer, K: int, size: int | None, floor: float, good, anywhere) -> np.ndarray:
    """:func:`_greedy` with additions scored by ``scorer`` (``good`` None: unconstrained)."""
    mask = np.zeros(K, dtype=bool)
    current = np.inf
    while mask.sum() < (size if size is not None else K):
        out = np.flatnonzero(~mask)
        vals = scorer.flips(mask, out, True)
        if good is not None:
            def build(idx, mask=mask, out=out):
                rows = np.repeat(mask[None], len(idx), axis=0)
                rows[np.arange(len(idx)), out[np.asarray(idx)]] = True
                return rows
            _record(anywhere, vals, build)
            vals = np.where(scorer.flips_valid(mask, out, True) & (vals >= floor), vals, np.inf)
            _record(good, vals, build)
        i = int(np.argmin(vals))
        if size is None and np.isfinite(current) and vals[i] >= current:
            break
        mask = mask.copy()
        mask[out[i]] = True
        current = float(vals[i])
    return mask


def _local_search(loss, mask: np.ndarray, *, allow_resize: bool, record=None) -> int:
    """Steepest descent over swaps (and add/drop) from ``mask``; returns the evaluations made.
    ``loss(masks)`` returns ``(values used for the search, raw values or None)``."""
    current = float(loss(mask[None])[0][0])
    n_eval = 1
    while True:
        moves = _neighbours(mask, allow_resize=allow_resize)
        if len(moves) == 0:
            return n_eval
        vals, raw_vals = loss(moves)
        if record is not None:
            record.add(moves, vals)
        n_eval += len(moves)
        i = int(np.argmin(vals))
        if not np.isfinite(vals[i]) or vals[i] >= current - 1e-12 * max(1.0, abs(current) if np.isfinite(current) else 1.0):
            return n_eval
        mask, current = moves[i], float(vals[i])


def _greedy(loss, K: int, size: int | None) -> np.ndarray:
    """Forward selection: add the task that lowers the loss most, up to ``size`` tasks (or until
    nothing helps when ``size`` is None). Infinite (invalid) values are passed through while no
    finite one has been reached, so the search can walk into the support from outside it."""
    mask = np.zeros(K, dtype=bool)
    current = np.inf
    while mask.sum() < (size if size is not None else K):
        out = np.flatnonzero(~mask)
        cand = np.repeat(mask[None], len(out), axis=0)
        cand[np.arange(len(out)), out] = True
        vals = loss(cand)
        i = int(np.argmin(vals))
        if size is None and np.isfinite(current) and vals[i] >= current:
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
