"""Solve many subsets' linearized problems, batch by batch: :func:`solve_subsets` and its loop.

By default (``dtype="auto"``) every batch is solved in float32 and any subset that float32 cannot
bring to tolerance is finished in float64, warm-started from the float32 iterate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from .._progress import progress_bar
from ..features import HarvestedFeatures
from .checks import check_source_subsets
from .newton import Problem, solve_batch
from .settings import MEMORY_BUDGET, Settings, resolve_settings

__all__ = ["GradExConvergenceWarning", "Solver", "SubsetSolutions", "solve_subsets", "warn_unconverged"]


class GradExConvergenceWarning(RuntimeWarning):
    """Some subsets did not reach the gradient tolerance within ``max_iter`` Newton steps."""


@dataclass
class SubsetSolutions:
    """Solutions of the linearized problem for m subsets (see :func:`solve_subsets`).

    ``solutions[j]`` is Z*_s for subset j (shape ``(m, k)``); ``converged[j]`` says whether the
    gradient norm reached ``tol`` times its value at ``z = 0``; ``n_iter[j]`` counts Newton steps;
    ``grad_norms[j]`` is the final Euclidean norm of the objective's gradient.
    """

    solutions: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    grad_norms: np.ndarray
    loss: str
    weighting: str
    lam: float


class Solver:
    """Solves batches of subsets in the first dtype; with dtype="auto", subsets that float32
    cannot bring to tolerance are re-solved in float64, warm-started from the float32 iterate."""

    def __init__(self, source, names, cfg: Settings, device):
        self.source, self.names, self.cfg, self.device = source, names, cfg, device
        self.problems = {}
        self.n_refined = 0

    def problem(self, dtype) -> Problem:
        if dtype not in self.problems:  # the float64 copy is only built when it is needed
            cfg = self.cfg
            self.problems[dtype] = Problem(
                self.source, self.names, cfg.loss, cfg.weighting, cfg.lam, self.device, dtype, cfg.preconditioner
            )
        return self.problems[dtype]

    def solve(self, S: np.ndarray):
        """Z (k, m) in float64, converged, n_iter, gradient norms for one batch of subsets."""
        cfg = self.cfg
        first = cfg.dtypes[0]
        Z, conv, iters, gn, g0 = solve_batch(self.problem(first), S, cfg.tols[first], cfg.max_iter, cfg.max_cg)
        Z = Z.to(torch.float64)
        if len(cfg.dtypes) > 1 and not conv.all():
            bad = np.flatnonzero(~conv)
            idx = torch.as_tensor(bad, device=Z.device)
            Z2, c2, it2, gn2, _ = solve_batch(
                self.problem(cfg.dtypes[1]), S[bad], cfg.tols[cfg.dtypes[1]], cfg.max_iter, cfg.max_cg,
                Z0=Z[:, idx], gnorm0=g0[bad],
            )
            Z[:, idx] = Z2.to(torch.float64)
            conv[bad], gn[bad] = c2, gn2
            iters[bad] += it2
            self.n_refined += len(bad)
        return Z, conv, iters, gn

    def batch_size(self, m: int, requested: Optional[int], n_target: int = 0) -> int:
        """``requested``, or the largest batch of the m subsets within ~1 GiB of working memory
        (including the predictions on ``n_target`` target samples)."""
        if requested:
            return requested
        prob = self.problem(self.cfg.dtypes[0])
        n, C, k = prob.n, prob.C, prob.k
        kk = 0 if prob.diagonal else 2 * k * k  # one preconditioner and its factor per subset
        per_subset = 8 * (7 * n * C + 2 * n + kk + 12 * k + 3 * n_target * C)  # float64 worst case
        return int(max(1, min(m, MEMORY_BUDGET // max(1, per_subset))))

    def batches(self, S: np.ndarray, batch_size: int, progress: bool, desc: str) -> Iterator[tuple]:
        """Solve the subsets ``S`` batch by batch; yields :meth:`solve`'s result per batch, with
        one progress bar over all subsets."""
        bar = progress_bar(len(S), progress, desc, "subset")
        try:
            for start in range(0, len(S), batch_size):
                out = self.solve(S[start : start + batch_size])
                yield out
                if bar is not None:
                    bar.update(len(out[1]))
        finally:
            if bar is not None:
                bar.close()


def warn_unconverged(converged, grad_norms):
    """Issue a :class:`GradExConvergenceWarning` naming the subsets that missed the tolerance."""
    bad = np.flatnonzero(~converged)
    if len(bad):
        warnings.warn(
            f"GradEx: {len(bad)} of {len(converged)} subsets did not reach the gradient tolerance "
            f"(first: rows {bad[:5].tolist()}, gradient norms {np.round(grad_norms[bad[:5]], 12).tolist()}); "
            "raise max_iter or lam, use dtype=torch.float64 (or \"auto\"), or loosen tol",
            GradExConvergenceWarning,
            stacklevel=3,
        )


def solve_subsets(
    source: HarvestedFeatures,
    subsets,
    *,
    lam: float = 1e-3,
    loss: Optional[str] = None,
    weighting: str = "task",
    batch_size: Optional[int] = None,
    max_iter: int = 50,
    max_cg: Optional[int] = None,
    preconditioner: str = "auto",
    tol: Optional[float] = None,
    device="cpu",
    dtype="auto",
    progress: bool = False,
) -> SubsetSolutions:
    """Solve the linearized fine-tuning problem (eq. 9) for every subset row; see
    :func:`~lightning_ksm.estimation.gradex`.

    Returns the solutions Z*_s as an ``(m, k)`` array with per-subset convergence facts.
    """
    cfg = resolve_settings(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg)
    S, names = check_source_subsets(source, subsets, cfg.loss)
    solver = Solver(source, names, cfg, device)
    bs = solver.batch_size(len(S), batch_size)
    Zs, conv, iters, gns = [], [], [], []
    for Z, c, it, gn in solver.batches(S, bs, progress, "GradEx solve"):
        Zs.append(Z.T.cpu().numpy())
        conv.append(c), iters.append(it), gns.append(gn)
    out = SubsetSolutions(
        solutions=np.concatenate(Zs),
        converged=np.concatenate(conv),
        n_iter=np.concatenate(iters),
        grad_norms=np.concatenate(gns),
        loss=cfg.loss,
        weighting=weighting,
        lam=float(lam),
    )
    warn_unconverged(out.converged, out.grad_norms)
    return out
