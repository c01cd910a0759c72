"""Task-subset designs: random subsets for surrogate fitting, and leave-one/pair-out designs.

A subset is a row of a boolean matrix of shape (n_subsets, n_tasks); True means the task is in the
training mixture.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

__all__ = [
    "sample_subsets",
    "leave_one_out_subsets",
    "leave_pair_out_subsets",
    "all_subsets",
]

# Random rejection of duplicate/empty rows gives up after this many rounds.
_MAX_ROUNDS = 1000


def _check_n_tasks(n_tasks) -> int:
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, (int, np.integer)):
        raise ValueError(f"n_tasks must be an integer, got {n_tasks!r}")
    if n_tasks < 2:
        raise ValueError(f"n_tasks must be at least 2 for task attribution, got {n_tasks}")
    return int(n_tasks)


def sample_subsets(
    n_tasks: int,
    n_subsets: int,
    *,
    p: float | None = None,
    size: int | None = None,
    seed: int = 0,
    allow_empty: bool = False,
    unique: bool = False,
) -> np.ndarray:
    """Sample random task subsets.

    Each row is one subset. With ``p`` every task is included independently with probability ``p``
    (the Bernoulli design of the paper's Proposition 3.1); with ``size`` every subset holds exactly
    ``size`` tasks chosen uniformly. Give at most one of the two; with neither, ``p=0.5``.

    Args:
        n_tasks: number of tasks K (>= 2).
        n_subsets: number of subsets m (>= 1).
        p: inclusion probability in (0, 1).
        size: exact number of tasks per subset, 1 <= size <= n_tasks.
        seed: seed of the random generator; the same seed gives the same subsets.
        allow_empty: keep empty subsets (Bernoulli design only). By default empty rows are redrawn,
            so the design is Bernoulli(p) conditioned on being non-empty.
        unique: redraw duplicate rows so that all subsets differ. Raises if fewer than
            ``n_subsets`` distinct subsets exist.

    Returns:
        A boolean array of shape (n_subsets, n_tasks).
    """
    n_tasks = _check_n_tasks(n_tasks)
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, (int, np.integer)) or n_subsets < 1:
        raise ValueError(f"n_subsets must be a positive integer, got {n_subsets!r}")
    if p is not None and size is not None:
        raise ValueError("give either p (Bernoulli inclusion) or size (tasks per subset), not both")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise ValueError(f"size must be an integer, got {size!r}")
        if not 1 <= size <= n_tasks:
            raise ValueError(f"size must be between 1 and n_tasks={n_tasks}, got {size}")
        n_possible = _n_choose(n_tasks, int(size))
    else:
        p = 0.5 if p is None else p
        if not isinstance(p, (int, float, np.floating)) or not 0.0 < float(p) < 1.0:
            raise ValueError(f"p must be a probability strictly between 0 and 1, got {p!r}")
        p = float(p)
        n_possible = 2**n_tasks - (0 if allow_empty else 1)
    if unique and n_subsets > n_possible:
        raise ValueError(
            f"asked for {n_subsets} unique subsets but only {n_possible} distinct subsets exist "
            f"for n_tasks={n_tasks}" + (f", size={size}" if size is not None else "")
        )

    rng = np.random.default_rng(seed)

    def draw(count: int) -> np.ndarray:
        if size is not None:
            # Rank random keys per row; the `size` smallest are in the subset.
            keys = rng.random((count, n_tasks))
            ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
            return ranks < size
        return rng.random((count, n_tasks)) < p

    S = draw(n_subsets)
    for _ in range(_MAX_ROUNDS):
        bad = np.zeros(n_subsets, dtype=bool)
        if size is None and not allow_empty:
            bad |= ~S.any(axis=1)
        if unique:
            _, first = np.unique(S, axis=0, return_index=True)
            dup = np.ones(n_subsets, dtype=bool)
            dup[first] = False
            bad |= dup
        if not bad.any():
            return S
        S[bad] = draw(int(bad.sum()))
    raise RuntimeError(  # pragma: no cover - only with astronomically unlucky draws
        "could not draw enough distinct non-empty subsets; lower n_subsets or change p/size"
    )


def _n_choose(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def leave_one_out_subsets(n_tasks: int, *, include_full: bool = True) -> np.ndarray:
    """The leave-one-out design: row k omits task k; with ``include_full`` the first row is all tasks.

    Returns a boolean array of shape (n_tasks + 1, n_tasks) (or (n_tasks, n_tasks)).
    """
    n_tasks = _check_n_tasks(n_tasks)
    rows = ~np.eye(n_tasks, dtype=bool)
    if include_full:
        rows = np.vstack([np.ones((1, n_tasks), dtype=bool), rows])
    return rows


def leave_pair_out_subsets(
    n_tasks: int, *, include_full: bool = True, include_singles: bool = True
) -> np.ndarray:
    """The leave-pair-out design: one row per pair (i < j) omitting both tasks.

    With ``include_full`` the all-tasks row comes first; with ``include_singles`` the leave-one-out
    rows follow it, so the design holds everything needed for the pairwise interaction
    g(1) - g(1-e_i) - g(1-e_j) + g(1-e_i-e_j). Pair rows are in ``itertools.combinations`` order.
    """
    n_tasks = _check_n_tasks(n_tasks)
    blocks = []
    if include_full or include_singles:
        loo = leave_one_out_subsets(n_tasks, include_full=include_full)
        blocks.append(loo if include_singles else loo[:1])
    pairs = np.ones((n_tasks * (n_tasks - 1) // 2, n_tasks), dtype=bool)
    for row, (i, j) in enumerate(combinations(range(n_tasks), 2)):
        pairs[row, [i, j]] = False
    blocks.append(pairs)
    return np.vstack(blocks)


def all_subsets(n_tasks: int, *, include_empty: bool = False) -> np.ndarray:
    """Every subset of ``n_tasks`` tasks (2**K rows, minus the empty one by default); K <= 20."""
    n_tasks = _check_n_tasks(n_tasks)
    if n_tasks > 20:
        raise ValueError(f"all_subsets enumerates 2**n_tasks rows; n_tasks={n_tasks} is too many (max 20)")
    codes = np.arange(0 if include_empty else 1, 2**n_tasks)
    return ((codes[:, None] >> np.arange(n_tasks)) & 1).astype(bool)
