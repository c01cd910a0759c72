"""Input checks shared by the engine. Each error names the argument the user must fix."""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["check_int", "check_positive", "check_subset_matrix", "check_targets", "check_training_subsets"]


def check_subset_matrix(
    S,
    *,
    name: str = "S",
    n_tasks: Optional[int] = None,
    columns_of: Optional[str] = None,
    min_rows: int = 1,
    min_tasks: int = 2,
    allow_1d: bool = False,
    nonempty_rows: bool = False,
) -> np.ndarray:
    """Return ``S`` as a float64 (m, K) 0/1 matrix, or raise a ValueError naming the problem.

    The one check of a subset matrix. ``n_tasks``: the number of columns it must have, with
    ``columns_of`` saying where that number comes from (default: the model was fitted on that many
    tasks). ``allow_1d``: a 1-D array is one subset. ``nonempty_rows``: every subset must select a
    task (a subset to train on).
    """
    arr = np.asarray(S)
    if arr.ndim == 1 and allow_1d:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (n_subsets, n_tasks) 0/1 array, got an array of shape {arr.shape}"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    else:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must hold 0/1 numbers or booleans, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        bad = ~np.isin(arr, (0.0, 1.0))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"{name} must be binary (0/1 task indicators); {name}[{i}, {j}] = {arr[i, j]!r}"
            )
    if arr.shape[1] < min_tasks:
        raise ValueError(
            f"{name} has {arr.shape[1]} task column(s); task attribution needs at least {min_tasks} "
            f"task{'' if min_tasks == 1 else 's'}"
        )
    if n_tasks is not None and arr.shape[1] != n_tasks:
        against = columns_of or f"the model was fitted on {n_tasks} tasks"
        raise ValueError(f"{name} has {arr.shape[1]} columns but {against}; one column per task")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} has {arr.shape[0]} subsets (rows); at least {min_rows} are needed")
    if nonempty_rows:
        empty = np.flatnonzero(~arr.any(axis=1))
        if len(empty):
            raise ValueError(
                f"subset row {int(empty[0])} selects no task ({len(empty)} empty rows); every subset "
                "needs at least one task to train on"
            )
    return arr


def check_training_subsets(
    subsets, *, allow_1d: bool = True, n_tasks: Optional[int] = None, columns_of: Optional[str] = None
) -> np.ndarray:
    """Return subsets to train on as an (m, K) bool array: :func:`check_subset_matrix` with at least
    one row, one task column and no empty row (a subset with no task has nothing to train on). With
    ``allow_1d`` a 1-D array is one subset."""
    S = check_subset_matrix(
        subsets, name="subsets", n_tasks=n_tasks, columns_of=columns_of, min_tasks=1, allow_1d=allow_1d,
        nonempty_rows=True,
    )
    return S.astype(bool)


def check_targets(y, n_rows: int, *, name: str = "y") -> np.ndarray:
    """Return ``y`` as float64 of shape (m,) or (m, T), finite, with ``n_rows`` rows."""
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (n_subsets,) or (n_subsets, n_targets), got {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"{name} has {arr.shape[0]} rows but S has {n_rows} subsets; they must match")
    if arr.ndim == 2 and arr.shape[1] == 0:
        raise ValueError(f"{name} has no target columns")
    finite = np.isfinite(arr)
    if not finite.all():
        idx = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"{name} contains a non-finite value (NaN or inf) at index {idx}")
    return arr


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_int(name: str, value, minimum: int) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
