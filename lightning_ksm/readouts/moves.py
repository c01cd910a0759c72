"""Fast scoring of one-task moves (swap one task for another, add one, drop one) for the local
search of :mod:`.selection`, on a fitted :class:`~lightning_ksm.surrogates.KernelSurrogate`.

A move changes one or two coordinates of a 0/1 subset, so every quantity the kernel needs (the dot
product and the Hamming distance to each training subset) changes by +-1 per training subset. The
scorer keeps those per-training-subset numbers for the current subset and scores all moves from
them: O(moves x m) work instead of the O(moves x m x K) of building each candidate and calling
``predict``, which made the search cost grow as K^3 (benchmarks/task_scaling.py compares both).
The values are the surrogate's own predictions (tests compare them with ``predict``), and the
support check is the same Hamming-distance rule as :class:`~.support.Support`.
"""

from __future__ import annotations

import numpy as np

from .support import Support

__all__ = ["MoveScorer"]


class MoveScorer:
    """Scores the moves of one subset for one target column of a kernel surrogate.

    :meth:`applies` says whether the surrogate is supported (a fitted KernelSurrogate); otherwise
    :mod:`.selection` falls back to building the candidates and calling ``predict``.
    """

    def __init__(self, surrogate, column: int, support: Support):
        self.kind = surrogate._kernel_name()
        self.gamma = surrogate.gamma_
        self.degree, self.coef0 = surrogate.degree, surrogate.coef0
        X = np.asarray(surrogate.X_fit_, dtype=np.float64)
        self.X = X
        self.norms = X.sum(axis=1)
        self.alpha = np.asarray(surrogate.dual_coef_, dtype=np.float64)[:, column]
        self.bias = float(np.asarray(surrogate.y_mean_, dtype=np.float64).reshape(-1)[column])
        self.support = support
        self.SX = np.asarray(support.X, dtype=np.float64)  # distinct training subsets (for distances)
        self.s_norms = self.SX.sum(axis=1)

    @staticmethod
    def applies(surrogate) -> bool:
        """A fitted KernelSurrogate (by its fitted attributes: stages do not import each other)."""
        fitted = all(hasattr(surrogate, a) for a in ("dual_coef_", "X_fit_", "gamma_", "y_mean_"))
        name = getattr(surrogate, "_kernel_name", None)
        return fitted and callable(name) and name() in ("rbf", "linear", "poly")

    # -- the kernel from dot products ------------------------------------------------------------
    def _value(self, dot: np.ndarray, size) -> np.ndarray:
        """Predictions from dot products ``dot`` (..., m) with the training subsets at subset size ``size``."""
        if self.kind == "linear":
            k = dot
        elif self.kind == "rbf":
            k = np.exp(-self.gamma * np.clip(np.asarray(size)[..., None] + self.norms - 2.0 * dot, 0.0, None))
        else:
            k = (self.gamma * dot + self.coef0) ** self.degree
        return k @ self.alpha + self.bias

    def value(self, mask: np.ndarray) -> float:
        """The prediction at ``mask`` itself."""
        m = np.asarray(mask, dtype=np.float64)
        return float(self._value(self.X @ m, m.sum()))

    def _weights(self, dot: np.ndarray, size: float) -> np.ndarray:
        """rbf: alpha_r exp(-gamma H_r), so that a move's prediction is a product with exp(-gamma dH)."""
        H = np.clip(size + self.norms - 2.0 * dot, 0.0, None)
        return self.alpha * np.exp(-self.gamma * H)

    def swaps(self, mask: np.ndarray, inside: np.ndarray, outside: np.ndarray, dot=None) -> np.ndarray:
        """(len(inside), len(outside)) predictions after swapping inside[a] out and outside[b] in."""
        m = np.asarray(mask, dtype=np.float64)
        dot = self.X @ m if dot is None else dot
        size = m.sum()
        Xi, Xo = self.X[:, inside], self.X[:, outside]  # (m, |in|), (m, |out|)
        if self.kind == "linear":  # dot' = dot - X_i + X_o: separable
            a = self.alpha
            return float(dot @ a) + self.bias - (a @ Xi)[:, None] + (a @ Xo)[None, :]
        if self.kind == "rbf":
            # H' = H + 2 X_i - 2 X_o, so exp(-g H') = exp(-g H) (1 + a X_i) (1 + b X_o) for 0/1 X
            w = self._weights(dot, size)
            a, b = np.expm1(-2.0 * self.gamma), np.expm1(2.0 * self.gamma)
            wi, wo = w @ Xi, w @ Xo
            return (w.sum() + self.bias + a * wi[:, None] + b * wo[None, :]
                    + (a * b) * ((Xi.T * w) @ Xo))
        out = np.empty((len(inside), len(outside)))
        for a in range(len(inside)):  # polynomial: not separable, one row of moves at a time
            out[a] = self._value((dot - Xi[:, a])[None, :] + Xo.T, size)
        return out

    def flips(self, mask: np.ndarray, idx: np.ndarray, add: bool, dot=None) -> np.ndarray:
        """Predictions after adding (``add``) or dropping each task in ``idx``."""
        m = np.asarray(mask, dtype=np.float64)
        dot = self.X @ m if dot is None else dot
        size = m.sum()
        sign = 1.0 if add else -1.0
        Xs = self.X[:, idx]
        if self.kind == "linear":
            return float(dot @ self.alpha) + self.bias + sign * (self.alpha @ Xs)
        if self.kind == "rbf":  # adding j: H + 1 - 2 X_j; dropping i: H - 1 + 2 X_i (0/1 X: two values)
            w = self._weights(dot, size)
            wx = w @ Xs
            return np.exp(-self.gamma * sign) * (w.sum() - wx) + np.exp(self.gamma * sign) * wx + self.bias
        return self._value(dot[None, :] + sign * Xs.T, size + sign)

    # -- moves -----------------------------------------------------------------------------------
    def moves(self, mask: np.ndarray, *, allow_resize: bool, check: bool = True):
        """Every swap (and, with ``allow_resize``, addition and removal) of ``mask``: their
        predictions, whether each stays in the support (None without ``check``), and
        ``build(idx) -> masks`` for the moves at flat indices ``idx``."""
        inside, outside = np.flatnonzero(mask), np.flatnonzero(~mask)
        dot = self.X @ np.asarray(mask, dtype=np.float64)
        H = self._hamming(mask) if check and self.support.mode == "distance" else None
        vals, oks, kinds = [], [], []
        if len(inside) and len(outside):
            vals.append(self.swaps(mask, inside, outside, dot).ravel())
            oks.append(self.swaps_valid(mask, inside, outside, H).ravel() if check else None)
            kinds.append(("swap", len(vals[-1])))
        if allow_resize and len(outside):
            vals.append(self.flips(mask, outside, True, dot))
            oks.append(self.flips_valid(mask, outside, True, H) if check else None)
            kinds.append(("add", len(outside)))
        if allow_resize and len(inside) > 1:
            vals.append(self.flips(mask, inside, False, dot))
            oks.append(self.flips_valid(mask, inside, False, H) if check else None)
            kinds.append(("drop", len(inside)))
        if not vals:
            return np.zeros(0), (np.zeros(0, bool) if check else None), lambda idx: np.zeros((0, len(mask)), bool)

        def build(idx) -> np.ndarray:
            out = np.repeat(np.asarray(mask, bool)[None], len(idx), axis=0)
            for r, flat in enumerate(np.asarray(idx, dtype=np.int64)):
                for kind, n in kinds:
                    if flat < n:
                        break
                    flat -= n
                if kind == "swap":
                    a, b = divmod(int(flat), len(outside))
                    out[r, inside[a]], out[r, outside[b]] = False, True
                elif kind == "add":
                    out[r, outside[flat]] = True
                else:
                    out[r, inside[flat]] = False
            return out

        return np.concatenate(vals), (np.concatenate(oks) if check else None), build

    # -- the support -----------------------------------------------------------------------------
    def _sizes_ok(self, size: int) -> bool:
        s = self.support
        return s.mode == "none" or s.min_size <= size <= s.max_size

    def _hamming(self, mask: np.ndarray) -> np.ndarray:
        """Hamming distance of ``mask`` to each distinct training subset of the support."""
        m = np.asarray(mask, dtype=np.float64)
        return self.s_norms + m.sum() - 2.0 * (self.SX @ m)

    def swaps_valid(self, mask: np.ndarray, inside: np.ndarray, outside: np.ndarray, H=None) -> np.ndarray:
        """Which swaps stay inside the support (same rule as :meth:`Support.contains`); ``H``:
        :meth:`_hamming` of ``mask`` when already computed."""
        shape = (len(inside), len(outside))
        s = self.support
        if s.mode == "none":
            return np.ones(shape, dtype=bool)
        if not self._sizes_ok(int(np.sum(mask))):
            return np.zeros(shape, dtype=bool)
        if s.mode == "size":
            return np.ones(shape, dtype=bool)
        H = self._hamming(mask) if H is None else H
        r = s.radius
        # a swap changes H by 2 (X_i - X_o), one of -2, 0, +2
        if np.any(H + 2 <= r):
            return np.ones(shape, dtype=bool)
        ok = np.zeros(shape, dtype=bool)
        near = (H <= r)  # valid unless X_i = 1 and X_o = 0 (H grows by 2)
        if near.any():
            X = self.SX[near]
            bad = X[:, inside].T @ (1.0 - X[:, outside])
            ok |= bad < near.sum() - 0.5
        close = (H > r) & (H <= r + 2)  # valid only if X_i = 0 and X_o = 1 (H shrinks by 2)
        if close.any():
            X = self.SX[close]
            ok |= ((1.0 - X[:, inside]).T @ X[:, outside]) > 0.5
        return ok

    def flips_valid(self, mask: np.ndarray, idx: np.ndarray, add: bool, H=None) -> np.ndarray:
        s = self.support
        size = int(np.sum(mask)) + (1 if add else -1)
        if s.mode == "none":
            return np.ones(len(idx), dtype=bool)
        if not self._sizes_ok(size):
            return np.zeros(len(idx), dtype=bool)
        if s.mode == "size":
            return np.ones(len(idx), dtype=bool)
        H = self._hamming(mask) if H is None else H
        X = self.SX[:, idx]  # adding j: H + 1 - 2 X_j; dropping i: H - 1 + 2 X_i
        H2 = H[:, None] + (1.0 - 2.0 * X if add else 2.0 * X - 1.0)
        return H2.min(axis=0) <= s.radius
