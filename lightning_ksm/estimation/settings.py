"""The solver settings of one GradEx call: checked, with the defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AnalysisConfig, check_setting
from ..features import HarvestedFeatures
from .checks import check_scalar, task_names
from .losses import default_loss

__all__ = ["DEFAULT_TOL", "MEMORY_BUDGET", "PRECONDITIONERS", "Settings", "resolve_settings"]

PRECONDITIONERS = ("auto", "cholesky", "diagonal")
# Default relative gradient tolerance per dtype: float32 cannot resolve gradients much below 1e-5
# of their starting size (sums over n samples cancel), float64 can go far lower at almost no cost.
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
MEMORY_BUDGET = 1 << 30  # bytes of working memory per batch of subsets when batch_size=None


@dataclass
class Settings:
    """How to solve: loss, weighting, ridge strength, precisions, tolerances and step limits."""

    loss: str
    weighting: str
    lam: float
    dtypes: tuple  # (float32, float64) for dtype="auto": float64 re-solves what float32 cannot
    tols: dict
    max_iter: int
    max_cg: int
    preconditioner: str


def resolve_settings(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg) -> Settings:
    """Check the solver arguments against the source split and fill in every default."""
    if not isinstance(source, HarvestedFeatures):
        raise TypeError(f"source must be a HarvestedFeatures, got {type(source).__name__}")
    if loss is None:
        loss = default_loss(source.mode)
    # The settings the user also sets in AnalysisConfig are checked by its declaration (one message).
    for name, value in (("loss", loss), ("weighting", weighting), ("lam", lam)):
        check_setting(AnalysisConfig, name, value)
    if dtype == "auto":
        dtypes = (torch.float32, torch.float64)
    elif dtype in (torch.float32, torch.float64):
        dtypes = (dtype,)
    else:
        raise ValueError(f'dtype must be "auto", torch.float32 or torch.float64, got {dtype!r}')
    if tol is not None:
        check_scalar("tol", tol)
    tols = {dt: DEFAULT_TOL[dt] if tol is None else float(tol) for dt in dtypes}
    check_scalar("max_iter", max_iter, integer=True)
    if batch_size is not None:
        check_scalar("batch_size", batch_size, integer=True)
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    if preconditioner == "auto":
        # Full k x k preconditioners while K task matrices plus 16 subsets' factors fit in 1 GiB,
        # and while k <= n C: beyond that a factor costs more to apply than a Hessian product.
        K = len(task_names(source))
        itemsize = torch.finfo(dtypes[0]).bits // 8
        k, nC = source.proj_dim, source.n_samples * (1 if source.outputs.ndim == 1 else source.outputs.shape[1])
        fits = k**2 * itemsize * (K + 16) <= MEMORY_BUDGET
        preconditioner = "cholesky" if fits and k <= nC else "diagonal"
    if max_cg is None:
        max_cg = 50 if preconditioner == "cholesky" else 1000
    check_scalar("max_cg", max_cg, integer=True)
    return Settings(loss, weighting, float(lam), dtypes, tols, max_iter, max_cg, preconditioner)
