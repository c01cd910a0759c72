"""Score GradEx and surrogates against really retrained F(s) on held-out subsets (paper Tables 2, 3)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .._validation import check_int, check_training_subsets
from ..metrics import lds, relative_error
from ..quality import heldout_scores

__all__ = ["compare_with_retraining"]


def _as_2d(name: str, arr, m: int) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != m:
        raise ValueError(f"{name} must have shape ({m},) or ({m}, T) (one row per subset), got {np.shape(arr)}")
    if not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite value at index {idx}")
    return a


def _index(name: str, idx, m: int) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (m,):
            raise ValueError(f"{name} as a boolean mask needs shape ({m},), got {arr.shape}")
        arr = np.flatnonzero(arr)
    if arr.ndim != 1 or (len(arr) and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be row indices (ints) or a boolean mask over the {m} subsets")
    bad = np.flatnonzero((arr < 0) | (arr >= m))
    if len(bad):
        raise ValueError(f"{name}[{int(bad[0])}] = {arr[bad[0]]} is not a subset row (there are {m})")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} repeats a subset row")
    return arr.astype(np.int64)


def compare_with_retraining(
    subsets,
    real,
    estimate,
    *,
    fit=None,
    heldout=None,
    n_fit: Optional[int] = None,
    surrogates: Optional[Mapping[str, object]] = None,
) -> dict:
    """Score GradEx and surrogates against really retrained F(s) on held-out subsets.

    Args:
        subsets: ``(m, K)`` 0/1 subsets that were both retrained and estimated.
        real: ``(m,)`` or ``(m, T)`` real losses F(s) (e.g. ``RetrainResult.losses``).
        estimate: the same shape: GradEx's F^(s) on the same subsets and target columns.
        fit, heldout: row indices (or boolean masks) of the subsets used to fit the surrogates
            and of those they are scored on. Default: the first ``n_fit`` rows fit, the rest are
            held out (``n_fit`` defaults to 80% of m, the paper's 40 of 50).
        surrogates: ``{name: estimator}``; default ``{"kernel": KernelSurrogate(),
            "linear": LinearSurrogate()}``. Each is cloned per fit.

    Returns:
        A dict with, for every surrogate ``name``:

        - ``"gradex_<name>"``: fitted on GradEx's F^ of the fit rows, scored against the **real**
          F of the held-out rows (what a user of the method gets);
        - ``"real_<name>"``: fitted on the real F of the fit rows, scored against the real F of the
          held-out rows (the surrogate's own ceiling, with m retrainings);

        each ``{"lds", "residual_error", ...}`` against the real held-out F (the GradEx-fitted ones
        also ``"lds_own"`` / ``"residual_error_own"`` against GradEx's own held-out F^: the
        surrogate's fit apart from GradEx's error); and ``"gradex"``: GradEx itself against the real F,
        ``lds_heldout`` (Spearman on the held-out rows), ``lds_all`` (all rows),
        ``relative_error_median`` / ``relative_error_mean`` (|F^ - F| / |F| over all rows and
        columns, paper Table 2); plus ``n_fit``, ``n_heldout``, ``n_targets``.
    """
    from ..surrogates import KernelSurrogate, LinearSurrogate

    S = check_training_subsets(subsets, allow_1d=False).astype(np.float64)
    m = len(S)
    F = _as_2d("real", real, m)
    E = _as_2d("estimate", estimate, m)
    if F.shape != E.shape:
        raise ValueError(f"real has shape {np.shape(real)} but estimate has {np.shape(estimate)}; they must match")
    if fit is None and heldout is None:
        n_fit = int(round(0.8 * m)) if n_fit is None else check_int("n_fit", n_fit, 2)
        fit_idx, ho_idx = np.arange(n_fit), np.arange(n_fit, m)
    else:
        if n_fit is not None:
            raise ValueError("give either n_fit or fit/heldout row indices, not both")
        fit_idx = _index("fit", fit, m) if fit is not None else None
        ho_idx = _index("heldout", heldout, m) if heldout is not None else None
        if fit_idx is None:
            fit_idx = np.setdiff1d(np.arange(m), ho_idx)
        if ho_idx is None:
            ho_idx = np.setdiff1d(np.arange(m), fit_idx)
        overlap = np.intersect1d(fit_idx, ho_idx)
        if len(overlap):
            raise ValueError(f"subset row {int(overlap[0])} is both in fit and in heldout; held-out rows must be unseen")
    if len(fit_idx) < 2:
        raise ValueError(f"need at least 2 subsets to fit the surrogates, got {len(fit_idx)}")
    if len(ho_idx) < 2:
        raise ValueError(f"need at least 2 held-out subsets to score (LDS is a rank correlation), got {len(ho_idx)}")
    if surrogates is None:
        surrogates = {"kernel": KernelSurrogate(), "linear": LinearSurrogate()}

    out: dict = {}
    Sf, Sh, Fh = S[fit_idx], S[ho_idx], F[ho_idx]
    for name, est in surrogates.items():
        out[f"gradex_{name}"] = heldout_scores(est, Sf, E[fit_idx], Sh, Fh, y_own=E[ho_idx])
        out[f"real_{name}"] = heldout_scores(est, Sf, F[fit_idx], Sh, Fh)
    out["gradex"] = {
        "lds_heldout": float(lds(Fh, E[ho_idx])),
        "lds_all": float(lds(F, E)),
        "relative_error_median": relative_error(E, F, reduce="median"),
        "relative_error_mean": relative_error(E, F, reduce="mean"),
    }
    out["n_fit"], out["n_heldout"], out["n_targets"] = int(len(fit_idx)), int(len(ho_idx)), int(F.shape[1])
    return out
