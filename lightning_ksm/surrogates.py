"""Surrogate models g(s) ~ F(s) over task-subset indicators s in {0, 1}^K.

Both classes are scikit-learn estimators (``get_params``/``set_params``, ``clone``, usable in
``GridSearchCV``). ``fit(S, y)`` takes an (m, K) 0/1 matrix and targets of shape (m,) or (m, T);
``predict`` returns the same trailing shape.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics.pairwise import pairwise_kernels
from sklearn.utils.validation import check_is_fitted

from ._validation import check_positive, check_subset_matrix, check_targets
from .config import SELECTIONS  # how gamma and alpha are chosen; see KernelSurrogate

__all__ = ["LinearSurrogate", "KernelSurrogate", "DEFAULT_ALPHA_GRID", "default_gamma_grid", "SELECTIONS"]

# Ridge strengths searched when ``alpha`` is not given: 1e-6 .. 1e2 in half decades. It covers the
# paper's range (1e-3 .. 1) and its default 0.1 with room on both sides: small gammas make the RBF
# kernel's non-constant eigenvalues small, and they need small alphas to be used at all.
DEFAULT_ALPHA_GRID = tuple(np.logspace(-6, 2, 17))

_KERNELS = ("rbf", "poly", "polynomial", "linear")
# Below this many subsets the m x m eigendecompositions are too small to gain from BLAS threads,
# and on a busy machine threads make them far slower (0.006 s vs 0.77 s seen for m = 200).
_SINGLE_THREAD_BELOW = 512


_CONTROLLER = None


def _blas_threads(m: int):
    global _CONTROLLER
    if m >= _SINGLE_THREAD_BELOW:
        return nullcontext()
    if _CONTROLLER is None:  # inspecting the loaded BLAS libraries costs ~10 ms: once per process
        from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1)
_PREDICT_CHUNK = 8192


def default_gamma_grid(n_tasks: int) -> tuple:
    """Kernel widths searched when ``gamma`` is not given: (1/K) x 10^[-3 .. 1] in half decades.

    The squared distance between two subsets is their Hamming distance, which grows with K, so the
    grid is relative to the paper's default gamma = 1/K (which it contains).
    """
    return tuple(np.logspace(-3, 1, 9) / n_tasks)


def _fit_shapes(estimator, y: np.ndarray) -> np.ndarray:
    estimator.single_output_ = y.ndim == 1
    y2 = y.reshape(len(y), -1)
    estimator.n_outputs_ = y2.shape[1]
    return y2


def _as_output(estimator, pred: np.ndarray) -> np.ndarray:
    return pred[:, 0] if estimator.single_output_ else pred


class LinearSurrogate(RegressorMixin, BaseEstimator):
    """Linear surrogate g(s) = a + b^T s fitted by least squares (the paper's equation 3).

    Args:
        alpha: ridge penalty on ``b``. With ``alpha=0`` (default) the ordinary least-squares fit is
            used, which is the minimum-norm solution when there are fewer subsets than tasks.
        fit_intercept: fit the intercept ``a`` (not penalized).

    Attributes:
        coef_: (K,) for 1-D targets, else (T, K). ``coef_[k] < 0`` means including task k lowers the
            predicted loss, i.e. the task helps.
        intercept_: scalar or (T,).
        inclusion_rate_: fraction of tasks included in the training subsets (used by
            :func:`lightning_ksm.readouts.ensemble_scores` to sample like the training design).
        X_fit_: (m, K) training subsets (the readouts' support).
    """

    def __init__(self, alpha: float = 0.0, fit_intercept: bool = True):
        self.alpha = alpha
        self.fit_intercept = fit_intercept

    def fit(self, S, y):
        """Fit on subsets ``S`` (m, K) and targets ``y`` (m,) or (m, T)."""
        S = check_subset_matrix(S, min_rows=2)
        y = check_targets(y, len(S))
        alpha = check_positive(self.alpha, "alpha", allow_zero=True)
        y2 = _fit_shapes(self, y)
        # LinearRegression solves with scipy's lstsq, which returns the minimum-norm solution for
        # rank-deficient designs (m < K); Ridge handles the penalized case.
        if alpha == 0:
            model = LinearRegression(fit_intercept=self.fit_intercept)
        else:
            model = Ridge(alpha=alpha, fit_intercept=self.fit_intercept)
        model.fit(S, y2)
        coef = np.atleast_2d(model.coef_)
        intercept = np.broadcast_to(np.asarray(model.intercept_, dtype=float), (y2.shape[1],)).copy()
        self.coef_ = coef[0] if self.single_output_ else coef
        self.intercept_ = float(intercept[0]) if self.single_output_ else intercept
        self.n_features_in_ = S.shape[1]
        self.inclusion_rate_ = float(S.mean())
        self.X_fit_ = S
        return self

    def predict(self, S) -> np.ndarray:
        """Predicted loss for each subset in ``S``."""
        check_is_fitted(self, "coef_")
        S = check_subset_matrix(S, n_tasks=self.n_features_in_)
        coef = np.atleast_2d(self.coef_)
        pred = S @ coef.T + np.atleast_1d(self.intercept_)
        return _as_output(self, pred)


class KernelSurrogate(RegressorMixin, BaseEstimator):
    """Kernel ridge regression surrogate (the paper's equations 7-8), centred targets.

    g(s) = mean(y) + sum_i theta_i k(s_i, s) with theta = (K + alpha I)^-1 (y - mean(y)).

    When ``gamma`` and/or ``alpha`` are None they are chosen over log grids from the exact
    leave-one-out predictions (one eigendecomposition of the m x m kernel matrix per gamma; every
    alpha and every target column is then scored in closed form). ``selection="lds"`` (default)
    keeps the pairs whose leave-one-out LDS (mean over columns of the Spearman correlation between
    each subset's leave-one-out prediction and its outcome) is within two standard errors of the
    best, and takes the one with the smallest leave-one-out MSE among them: the LDS decides when
    many target columns make it precise, the MSE when it is noisy (one column, few subsets);
    ``selection="mse"`` the smallest leave-one-out MSE of unit-variance columns. One pair is shared
    by all target columns (docs/concepts.md says why).

    Args:
        kernel: "rbf" (default), "poly" (alias "polynomial") or "linear".
        gamma: kernel width (rbf) or scale (poly); None selects it from ``gamma_grid``.
        alpha: ridge strength lambda; None selects it from ``alpha_grid``.
        degree: polynomial degree (poly only).
        coef0: constant term of the polynomial kernel (gamma s.s' + coef0)^degree.
        gamma_grid: candidate gammas; default ``default_gamma_grid(K)``.
        alpha_grid: candidate alphas; default ``DEFAULT_ALPHA_GRID``.
        selection: "lds" (default) or "mse": the leave-one-out criterion that picks gamma and alpha.

    Attributes:
        gamma_, alpha_: the values used.
        dual_coef_: (m, T) kernel ridge coefficients theta.
        y_mean_: (T,) target means.
        X_fit_: (m, K) training subsets.
        loo_mse_: leave-one-out MSE (of unit-variance targets) of the chosen pair.
        loo_lds_: leave-one-out LDS of the chosen pair (``selection="lds"``), else None.
        cv_results_: dict with "gamma", "alpha" grids and the (n_gamma, n_alpha) "loo_mse" (and
            "loo_lds") tables.
    """

    def __init__(
        self,
        kernel: str = "rbf",
        gamma: float | None = None,
        alpha: float | None = None,
        degree: int = 2,
        coef0: float = 1.0,
        gamma_grid=None,
        alpha_grid=None,
        selection: str = "lds",
    ):
        self.selection = selection
        self.kernel = kernel
        self.gamma = gamma
        self.alpha = alpha
        self.degree = degree
        self.coef0 = coef0
        self.gamma_grid = gamma_grid
        self.alpha_grid = alpha_grid

    # -- kernel -----------------------------------------------------------------------------
    def _kernel_name(self) -> str:
        if self.kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got {self.kernel!r}")
        return "poly" if self.kernel == "polynomial" else self.kernel

    def _gram(self, A: np.ndarray, B: np.ndarray, gamma: float | None) -> np.ndarray:
        name = self._kernel_name()
        A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
        dot = A @ B.T
        # Direct formulas (scikit-learn's pairwise_kernels validates its inputs on every call, which
        # dominated the bootstrap's many small refits).
        if name == "linear":
            return dot
        if name == "rbf":
            d2 = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * dot
            return np.exp(-gamma * np.clip(d2, 0.0, None))
        if name == "poly":
            return (gamma * dot + self.coef0) ** self.degree
        params = {}
        if name in ("rbf", "poly"):
            params["gamma"] = gamma
        if name == "poly":
            params.update(degree=self.degree, coef0=self.coef0)
        return pairwise_kernels(A, B, metric=name, **params)

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, S, y):
        """Fit on subsets ``S`` (m, K) and targets ``y`` (m,) or (m, T); selects gamma/alpha if unset."""
        S = check_subset_matrix(S, min_rows=2)
        y = check_targets(y, len(S))
        name = self._kernel_name()
        if name == "poly" and (int(self.degree) != self.degree or self.degree < 1):
            raise ValueError(f"degree must be a positive integer, got {self.degree!r}")
        y2 = _fit_shapes(self, y)
        K = S.shape[1]

        if name == "linear":
            gammas = [None]
        elif self.gamma is not None:
            gammas = [check_positive(self.gamma, "gamma")]
        else:
            gammas = list(self.gamma_grid) if self.gamma_grid is not None else list(default_gamma_grid(K))
            for g in gammas:
                check_positive(g, "gamma_grid entry")
        if self.alpha is not None:
            alphas = [check_positive(self.alpha, "alpha")]
        else:
            alphas = list(self.alpha_grid) if self.alpha_grid is not None else list(DEFAULT_ALPHA_GRID)
            for a in alphas:
                check_positive(a, "alpha_grid entry")
        if not gammas or not alphas:
            raise ValueError("gamma_grid and alpha_grid must not be empty")

        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        self.y_mean_ = y2.mean(axis=0)
        yc = y2 - self.y_mean_
        scored = _scoring_targets(yc)
        ranked = _ranking_targets(yc) if self.selection == "lds" else None

        with _blas_threads(len(S)):
            return self._select_and_fit(S, yc, scored, ranked, gammas, alphas)

    def _select_and_fit(self, S, yc, scored, ranked, gammas, alphas):
        K = S.shape[1]
        table = np.full((len(gammas), len(alphas)), np.inf)
        lds_table = np.full((len(gammas), len(alphas)), -np.inf)
        eigs = {}
        for gi, gamma in enumerate(gammas):
            lam, Q = _eigh_psd(self._gram(S, S, gamma))
            eigs[gi] = (lam, Q)
            if len(gammas) * len(alphas) > 1:
                Z = Q.T @ scored
                Q2 = Q * Q
                Zr = None if ranked is None else Q.T @ ranked[0]
                for ai, alpha in enumerate(alphas):
                    table[gi, ai] = _loo_mse(lam, Q, Q2, Z, alpha)
                    if Zr is not None:
                        lds_table[gi, ai] = _loo_lds(lam, Q, Q2, Zr, alpha, ranked)
        if ranked is not None and np.isfinite(lds_table).any():
            # The largest leave-one-out LDS up to two standard errors; among those pairs the smallest
            # leave-one-out MSE. With one target column the LDS of m leave-one-out predictions is
            # noisy (se ~ (1 - r^2) / sqrt(m - 3)) and the MSE decides; with many columns the se
            # shrinks and the LDS decides.
            best_lds = float(np.max(lds_table))
            n_eff = min(ranked[0].shape[1], len(S))
            se = (1.0 - min(best_lds, 0.999) ** 2) / np.sqrt(max(len(S) - 3, 1) * n_eff)
            top = lds_table >= best_lds - 2.0 * se - 1e-9  # two se: the grid's maximum is optimistic
            gi, ai = np.unravel_index(np.argmin(np.where(top, table, np.inf)), table.shape)
        else:
            gi, ai = np.unravel_index(np.argmin(table), table.shape)
        gi, ai = int(gi), int(ai)
        self.gamma_ = gammas[gi]
        self.alpha_ = alphas[ai]
        lam, Q = eigs[gi]
        self.dual_coef_ = _dual_coef(lam, Q, yc, self.alpha_)  # reuses the chosen gamma's eigendecomposition
        self.X_fit_ = S
        self.n_features_in_ = K
        self.inclusion_rate_ = float(S.mean())
        self.loo_mse_ = float(table[gi, ai]) if np.isfinite(table[gi, ai]) else None
        self.cv_results_ = {"gamma": list(gammas), "alpha": list(alphas), "loo_mse": table}
        if ranked is not None:
            self.cv_results_["loo_lds"] = lds_table
        self.loo_lds_ = float(lds_table[gi, ai]) if np.isfinite(lds_table[gi, ai]) else None
        return self

    def predict(self, S) -> np.ndarray:
        """Predicted loss for each subset in ``S``."""
        check_is_fitted(self, "dual_coef_")
        S = check_subset_matrix(S, n_tasks=self.n_features_in_)
        out = np.empty((len(S), self.dual_coef_.shape[1]))
        for start in range(0, len(S), _PREDICT_CHUNK):
            block = S[start : start + _PREDICT_CHUNK]
            out[start : start + len(block)] = self._gram(block, self.X_fit_, self.gamma_) @ self.dual_coef_
        out += self.y_mean_
        return _as_output(self, out)

    def refit_predictions(self, S, y, rows, designs):
        """Refit on resampled rows, predict on fixed designs: for each index vector ``r`` in ``rows``,
        the predictions on each of ``designs`` of this surrogate refitted on ``(S[r], y[r])`` with its
        selected gamma and alpha fixed (what ``clone`` + ``fit`` + ``predict`` gives, for a bootstrap).

        The kernel between the subsets and every design is computed once: a resample's kernel
        matrices are slices of it, so each replicate costs one m x m eigendecomposition. Yields one
        list of ``(len(design), T)`` arrays per ``r``.
        """
        check_is_fitted(self, "dual_coef_")
        S = check_subset_matrix(S, n_tasks=self.n_features_in_)
        y2 = check_targets(y, len(S)).reshape(len(S), -1)
        with _blas_threads(len(S)):
            G = self._gram(S, S, self.gamma_)
            cross = [self._gram(np.asarray(D, dtype=np.float64), S, self.gamma_) for D in designs]
            for r in rows:
                r = np.asarray(r)
                yr = y2[r]
                mean = yr.mean(axis=0)
                theta = _dual_coef(*_eigh_psd(G[np.ix_(r, r)]), yr - mean, self.alpha_)
                yield [C[:, r] @ theta + mean for C in cross]


def _dual_coef(lam: np.ndarray, Q: np.ndarray, yc: np.ndarray, alpha: float) -> np.ndarray:
    """theta = (G + alpha I)^-1 yc = Q diag(1 / (lam + alpha)) Q^T yc, from G's eigendecomposition."""
    return Q @ ((Q.T @ yc) / (lam + alpha)[:, None])


def _eigh_psd(G: np.ndarray):
    lam, Q = np.linalg.eigh(G)
    return np.clip(lam, 0.0, None), Q


def _scoring_targets(yc: np.ndarray) -> np.ndarray:
    """Unit-variance columns for model selection, reduced to at most m columns.

    Only the row norms of (smoother residual operator) @ Y enter the leave-one-out error, and those
    depend on Y only through Y Y^T; so when T > m we replace Y by an m-column factor R^T with
    R^T R = Y Y^T (a QR of Y^T). This bounds the cost per (gamma, alpha) at O(m^2 min(m, T)).
    """
    scale = yc.std(axis=0)
    scale[scale == 0] = 1.0
    Y = yc / scale
    if Y.shape[1] > Y.shape[0]:
        Y = np.linalg.qr(Y.T, mode="r").T
    return Y


_MAX_RANKED_COLUMNS = 256


def _ranking_targets(yc: np.ndarray):
    """The columns scored by leave-one-out LDS (non-constant ones; at most 256, evenly spread) and
    their centred, unit-norm ranks: ``(Y, R)``."""
    from scipy.stats import rankdata

    keep = np.flatnonzero(yc.std(axis=0) > 0)
    if len(keep) > _MAX_RANKED_COLUMNS:
        keep = keep[np.linspace(0, len(keep) - 1, _MAX_RANKED_COLUMNS).round().astype(int)]
    Y = yc[:, keep]
    R = rankdata(Y, axis=0)
    R = R - R.mean(axis=0)
    R /= np.linalg.norm(R, axis=0)
    return Y, R


def _loo_lds(lam, Q, Q2, Z, alpha, ranked) -> float:
    """Mean over columns of the Spearman correlation between the leave-one-out predictions and the
    targets: the held-out LDS, computed without refitting (the same closed form as :func:`_loo_mse`)."""
    from scipy.stats import rankdata

    Y, R = ranked
    if Y.shape[1] == 0:
        return -np.inf
    resid = Q @ (Z * (alpha / (lam + alpha))[:, None])
    h = Q2 @ (lam / (lam + alpha))
    pred = Y - resid / np.clip(1.0 - h, 1e-12, None)[:, None]
    P = rankdata(pred, axis=0)
    P = P - P.mean(axis=0)
    norm = np.linalg.norm(P, axis=0)
    corr = np.where(norm > 0, (P * R).sum(axis=0) / np.where(norm > 0, norm, 1.0), 0.0)
    return float(corr.mean())


def _loo_mse(lam, Q, Q2, Z, alpha) -> float:
    """Closed-form leave-one-out MSE of kernel ridge (for centred targets).

    With K = Q diag(lam) Q^T the fitted values are H y, H = Q diag(lam/(lam+alpha)) Q^T, and the
    leave-one-out residual of row i is (y_i - (H y)_i) / (1 - H_ii).
    """
    resid = Q @ (Z * (alpha / (lam + alpha))[:, None])
    h = Q2 @ (lam / (lam + alpha))
    denom = np.clip(1.0 - h, 1e-12, None)
    return float(np.mean((resid / denom[:, None]) ** 2))
