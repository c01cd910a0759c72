"""Where a surrogate has evidence: the region of {0,1}^K near the subsets it was fitted on.

A surrogate fitted on subsets of 18..25 tasks says little about a subset of 4 tasks: kernel ridge
there returns the prior mean plus whatever its basis functions do far from the data, and a
"best subset" found there can be impossible (a negative cross-entropy) or simply wrong. Readouts
that search over subsets (best subsets, co-training groups) therefore search only inside the
support:

- ``"size"``: subset sizes within the range of the training subsets' sizes;
- ``"distance"`` (default): that, and a Hamming distance of at most ``radius`` to the nearest
  training subset. The default radius is the largest nearest-neighbour distance among the training
  subsets themselves (every training subset has a neighbour that close, so a candidate that close
  to one is as well supported as the training data are), at least 1;
- ``"none"``: everywhere (the old behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SUPPORT_MODES

__all__ = ["Support", "SUPPORT_MODES", "support_of"]
_CHUNK = 4096


@dataclass
class Support:
    """The support of a surrogate's training subsets ``X`` (m, K); see the module docstring."""

    X: np.ndarray
    mode: str = "distance"
    radius: int | None = None

    def __post_init__(self):
        if self.mode not in SUPPORT_MODES:
            raise ValueError(f"support must be one of {list(SUPPORT_MODES)}, got {self.mode!r}")
        self.X = np.unique(np.asarray(self.X, dtype=bool), axis=0)
        sizes = self.X.sum(axis=1)
        self.min_size, self.max_size = int(sizes.min()), int(sizes.max())
        if self.radius is None:
            self.radius = self.default_radius(self.X)
        self.radius = int(self.radius)

    @staticmethod
    def default_radius(X: np.ndarray) -> int:
        """The largest nearest-neighbour Hamming distance among the distinct rows of ``X`` (>= 1)."""
        X = np.asarray(X, dtype=np.int32)
        if len(X) < 2:
            return 1
        worst = 1
        for start in range(0, len(X), _CHUNK):
            block = X[start:start + _CHUNK]
            d = block @ (1 - X).T + (1 - block) @ X.T
            d[np.arange(len(block)), np.arange(start, start + len(block))] = X.shape[1] + 1
            worst = max(worst, int(d.min(axis=1).max()))
        return worst

    def distance(self, masks: np.ndarray) -> np.ndarray:
        """Hamming distance of each mask to its nearest training subset."""
        M = np.asarray(masks, dtype=np.int32).reshape(-1, self.X.shape[1])
        X = self.X.astype(np.int32)
        out = np.empty(len(M), dtype=np.int64)
        for start in range(0, len(M), _CHUNK):
            block = M[start:start + _CHUNK]
            out[start:start + len(block)] = (block @ (1 - X).T + (1 - block) @ X.T).min(axis=1)
        return out

    def contains(self, masks: np.ndarray) -> np.ndarray:
        """Boolean per mask: inside the support."""
        M = np.asarray(masks, dtype=bool).reshape(-1, self.X.shape[1])
        if self.mode == "none":
            return np.ones(len(M), dtype=bool)
        sizes = M.sum(axis=1)
        ok = (sizes >= self.min_size) & (sizes <= self.max_size)
        if self.mode == "distance" and ok.any():
            idx = np.flatnonzero(ok)
            ok[idx] = self.distance(M[idx]) <= self.radius
        return ok

    def describe(self) -> dict:
        """A JSON-able description (shown in the report)."""
        out = {"mode": self.mode, "min_size": self.min_size, "max_size": self.max_size}
        if self.mode == "distance":
            out["radius"] = self.radius
        return out


def support_of(surrogate, mode: str = "distance", radius: int | None = None) -> Support:
    """The :class:`Support` of a fitted surrogate (its ``X_fit_`` training subsets)."""
    X = getattr(surrogate, "X_fit_", None)
    if X is None:
        raise ValueError(
            f"{type(surrogate).__name__} does not record its training subsets (X_fit_); pass support='none'"
        )
    return Support(X, mode, radius)
