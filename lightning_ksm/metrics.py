"""How well a surrogate (or GradEx) predicts real outcomes F(s) across subsets.

All functions take ``y_true`` and ``y_pred`` of shape (m,) or (m, T): m subsets, T target columns.
Scores are computed per target column across subsets and then averaged.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

__all__ = ["lds", "LDSResult", "pearson", "residual_error", "relative_error"]


class LDSResult(NamedTuple):
    """Linear datamodeling score with its per-column details.

    Attributes:
        mean: mean Spearman correlation over the non-constant target columns.
        per_column: (T,) Spearman correlation per column, NaN where the column was skipped.
        n_skipped: number of columns skipped because ``y_true`` or ``y_pred`` was constant there.
    """

    mean: float
    per_column: np.ndarray
    n_skipped: int


def _pair(y_true, y_pred, min_rows: int = 2):
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"y_true has shape {a.shape} but y_pred has shape {b.shape}; they must match")
    if a.ndim not in (1, 2):
        raise ValueError(f"y_true must have shape (m,) or (m, T), got {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} subsets (rows) to compare, got {a.shape[0]}")
    for name, arr in (("y_true", a), ("y_pred", b)):
        if not np.isfinite(arr).all():
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise ValueError(f"{name} contains a non-finite value at index {idx}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def _column_corr(a: np.ndarray, b: np.ndarray):
    """Pearson correlation per column; NaN for columns where either side is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    tiny = np.finfo(float).eps * len(a)
    const = (na <= tiny * (1 + np.abs(a).max(axis=0))) | (nb <= tiny * (1 + np.abs(b).max(axis=0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / (na * nb)
    r[const] = np.nan
    return np.clip(r, -1.0, 1.0), const


def _summarize(r: np.ndarray, const: np.ndarray, what: str, return_per_column: bool):
    n_skipped = int(const.sum())
    if n_skipped == len(r):
        raise ValueError(f"{what} is undefined: every target column is constant in y_true or y_pred")
    if n_skipped:
        warnings.warn(f"{what}: skipped {n_skipped} of {len(r)} constant target column(s)", stacklevel=3)
    mean = float(np.nanmean(r))
    return LDSResult(mean, r, n_skipped) if return_per_column else mean


def lds(y_true, y_pred, *, return_per_column: bool = False):
    """Linear datamodeling score: mean over target columns of the Spearman correlation across subsets.

    Columns where ``y_true`` or ``y_pred`` is constant have no rank correlation; they are skipped,
    counted, and a warning says how many. Ties get average ranks.

    Returns:
        The mean score (float), or an :class:`LDSResult` with ``return_per_column=True``.
    """
    a, b = _pair(y_true, y_pred)
    r, const = _column_corr(rankdata(a, axis=0), rankdata(b, axis=0))
    return _summarize(r, const, "LDS", return_per_column)


def pearson(y_true, y_pred, *, return_per_column: bool = False):
    """Mean over target columns of the Pearson correlation across subsets (constant columns skipped)."""
    a, b = _pair(y_true, y_pred)
    r, const = _column_corr(a, b)
    return _summarize(r, const, "Pearson correlation", return_per_column)


def residual_error(y_true, y_pred) -> float:
    """Normalized residual error: sum of squared residuals over the total sum of squares, averaged
    over target columns (0 is perfect; 1 is no better than predicting each column's mean).

    The paper's Tables 1 and 8 report a residual error without a normalization we could recover;
    we normalize by each column's variance so that columns and problems are comparable (see
    docs/concepts.md). Columns with zero variance are skipped.
    """
    a, b = _pair(y_true, y_pred)
    ss_res = ((a - b) ** 2).sum(axis=0)
    ss_tot = ((a - a.mean(axis=0)) ** 2).sum(axis=0)
    keep = ss_tot > 0
    if not keep.any():
        raise ValueError("residual error is undefined: every column of y_true is constant")
    return float(np.mean(ss_res[keep] / ss_tot[keep]))


def relative_error(estimate, truth, *, reduce: str = "median") -> float:
    """|estimate - truth| / |truth| over all entries, reduced by median (default) or mean.

    This is how GradEx's estimate F^(s) is compared with really fine-tuned F(s) (paper Table 2).
    """
    tru, est = _pair(truth, estimate, min_rows=1)
    if np.any(tru == 0):
        raise ValueError("truth contains zeros; relative error is undefined there")
    rel = np.abs(est - tru) / np.abs(tru)
    if reduce == "median":
        return float(np.median(rel))
    if reduce == "mean":
        return float(np.mean(rel))
    raise ValueError(f"reduce must be 'median' or 'mean', got {reduce!r}")
