"""GradEx: linearized fine-tuning on many task subsets at once (paper section 3.3, Algorithm 2).

Around the snapshot weights W0 a model output is replaced by its first-order expansion
(equation 9): ``f(x) ~ f0(x) + J(x) z``, where ``J(x)`` is the (randomly projected) Jacobian of
the output and ``z`` the (projected) weight change. Fine-tuning on a subset ``s`` of the K source
tasks then becomes a small convex problem in ``z`` (k numbers):

    Z*_s = argmin_z  sum_t a_st * sum_{i in T_t} loss(f0_i + J_i z, y_i) + lam/2 |z|^2

with per-sample weights ``a_st``: ``weighting="task"`` gives ``s_t / (|s| n_t)`` (every task is
averaged over its own samples, then the selected tasks are averaged), ``weighting="sample"`` gives
``s_t / sum_u s_u n_u`` (every selected sample counts the same). The estimate ``F^(s)`` is the mean
loss of ``f0 + J Z*_s`` on each target group.

The m subsets are solved together: all their predictions are one matrix product ``J Z`` and all
their gradients another. Newton's method with conjugate gradients (exact Hessian-vector products)
is preconditioned, per subset, by the Hessian at ``z = 0``; that Hessian is a weighted sum of K
per-task matrices computed once, so every preconditioner costs one small Cholesky factorization.
For the squared loss the Hessian does not depend on ``z``, so the first Newton step is the exact
closed-form solution. By default (``dtype="auto"``) the solve runs in float32 and any subset that
float32 cannot bring to tolerance is finished in float64. See docs/gradex.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ._validation import check_training_subsets
from .features import HarvestedFeatures

__all__ = [
    "LOSSES",
    "PRECONDITIONERS",
    "WEIGHTINGS",
    "GradExConvergenceWarning",
    "GradExResult",
    "SubsetSolutions",
    "default_loss",
    "gradex",
    "solve_subsets",
    "subset_sample_weights",
]

LOSSES = ("cross_entropy", "logistic", "squared")
WEIGHTINGS = ("task", "sample")
PRECONDITIONERS = ("auto", "cholesky", "diagonal")
_MODE_TO_LOSS = {
    "logits": "cross_entropy",
    "margin": "logistic",
    "logistic": "logistic",
    "regression": "squared",
}
# Default relative gradient tolerance per dtype: float32 cannot resolve gradients much below 1e-5
# of their starting size (sums over n samples cancel), float64 can go far lower at almost no cost.
_DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}
_MEMORY_BUDGET = 1 << 30  # bytes of working memory per batch of subsets when batch_size=None


class GradExConvergenceWarning(RuntimeWarning):
    """Some subsets did not reach the gradient tolerance within ``max_iter`` Newton steps."""


# --------------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------------


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


@dataclass
class GradExResult:
    """Estimated target losses F^(s) for m subsets and T target groups.

    - ``losses``: ``(m, T)`` mean loss of the linearized model ``f0 + J Z*_s`` on each target
      group; ``target_names`` names the T columns: one per target task present in the target
      split (in task-id order), then ``"all"`` (every target sample).
    - ``accuracy``: ``(m, T)`` for classification losses (argmax for cross-entropy, sign for
      logistic), else ``None``.
    - ``metric_values``: ``(m, T)`` values of the user ``metric`` callable, or ``None``.
    - ``converged``, ``n_iter``, ``grad_norms``, ``solution_norms``: per-subset solver facts.
    - ``solutions``: ``(m, k)`` Z*_s when ``keep_solutions=True``, else ``None``.
    """

    losses: np.ndarray
    target_names: list
    subsets: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    grad_norms: np.ndarray
    solution_norms: np.ndarray
    loss: str
    weighting: str
    lam: float
    accuracy: Optional[np.ndarray] = None
    metric_values: Optional[np.ndarray] = None
    solutions: Optional[np.ndarray] = None
    extras: dict = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        """The ``(m,)`` estimated losses of one target group, by name (e.g. ``"all"``)."""
        try:
            j = self.target_names.index(name)
        except ValueError:
            raise KeyError(f"no target group {name!r}; groups are {self.target_names}") from None
        return self.losses[:, j]


# --------------------------------------------------------------------------------------------
# Losses, on predictions laid out as (n, C, m): sample, output coordinate, subset
# --------------------------------------------------------------------------------------------


class _Logistic:
    """Binary logistic loss softplus(f) - y f on a scalar output (C = 1), labels in {0, 1}."""

    name = "logistic"

    @staticmethod
    def value(P, y):
        # y in {0, 1}: softplus(f) - y f = softplus((1 - 2y) f), one pass fewer
        return torch.nn.functional.softplus((1 - 2 * y) * P)[:, 0]

    @staticmethod
    def grad_and_curv(P, y):
        s = torch.sigmoid(P)
        return s - y, s * (1 - s)

    @staticmethod
    def weighted_curvature(curv, W):
        return curv * W

    @staticmethod
    def hvp(state, U):
        return state * U

    @staticmethod
    def predict_correct(P, y):
        return ((P[:, 0] > 0) == (y[:, 0] > 0.5)).to(P.dtype)


class _Squared:
    """Squared loss 0.5 |f - y|^2 on C >= 1 outputs."""

    name = "squared"

    @staticmethod
    def value(P, y):
        R = P - y
        return 0.5 * (R[:, 0] ** 2 if R.shape[1] == 1 else (R * R).sum(1))

    @staticmethod
    def grad_and_curv(P, y):
        return P - y, None

    @staticmethod
    def weighted_curvature(curv, W):
        return W

    @staticmethod
    def hvp(state, U):
        return state * U

    predict_correct = None


class _CrossEntropy:
    """Softmax cross-entropy on C >= 2 logits, integer labels in [0, C)."""

    name = "cross_entropy"

    @staticmethod
    def value(P, y):
        picked = P.gather(1, y.view(-1, 1, 1).expand(-1, 1, P.shape[2])).squeeze(1)
        return torch.logsumexp(P, dim=1) - picked

    @staticmethod
    def grad_and_curv(P, y):
        p = torch.softmax(P, dim=1)
        g = p.clone()
        g[torch.arange(P.shape[0], device=P.device), y] -= 1.0
        return g, p

    @staticmethod
    def weighted_curvature(p, W):
        return p, p * W

    @staticmethod
    def hvp(state, U):
        p, pW = state
        return pW * (U - (p * U).sum(1, keepdim=True))

    @staticmethod
    def predict_correct(P, y):
        return (P.argmax(1) == y.view(-1, 1)).to(P.dtype)


_LOSS_IMPL = {"logistic": _Logistic, "squared": _Squared, "cross_entropy": _CrossEntropy}


# --------------------------------------------------------------------------------------------
# Validation (all of it runs before any solve)
# --------------------------------------------------------------------------------------------


def default_loss(mode: str) -> str:
    """The loss GradEx uses for an output mode: logits -> cross_entropy, margin/logistic ->
    logistic, regression -> squared. ``custom`` has no default (pass ``loss=`` explicitly)."""
    if mode not in _MODE_TO_LOSS:
        raise ValueError(
            f"output mode {mode!r} has no default GradEx loss; pass loss= one of {LOSSES}"
        )
    return _MODE_TO_LOSS[mode]


def _task_names(feats: HarvestedFeatures) -> list:
    names = [str(t) for t in feats.task_names]
    if not names and len(feats.task_ids):
        names = [f"task{t}" for t in range(int(np.max(feats.task_ids)) + 1)]
    return names


def _first_bad_row(arr: np.ndarray, bad) -> Optional[int]:
    """Index of the first row of ``arr`` where ``bad(chunk)`` flags any entry (chunked: no
    full-size temporaries for memory-mapped arrays)."""
    n = len(arr)
    step = max(1, (1 << 22) // max(1, int(np.prod(arr.shape[1:], dtype=np.int64))))
    for start in range(0, n, step):
        chunk = np.asarray(arr[start : start + step])
        flags = bad(chunk).reshape(len(chunk), -1).any(axis=1)
        if flags.any():
            return start + int(np.flatnonzero(flags)[0])
    return None


def _check_split(feats, split: str, loss: str) -> None:
    if not isinstance(feats, HarvestedFeatures):
        raise TypeError(f"{split} must be a HarvestedFeatures, got {type(feats).__name__}")
    if feats.n_samples == 0:
        raise ValueError(f"the {split} split has no samples")
    tid = np.asarray(feats.task_ids)
    if not np.issubdtype(tid.dtype, np.integer):
        if not np.issubdtype(tid.dtype, np.floating) or not np.all(tid == np.round(tid)):
            raise ValueError(f"{split}.task_ids must be integers, got dtype {tid.dtype}")
    names = _task_names(feats)
    bad = np.flatnonzero((tid < 0) | (tid >= len(names)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{split}.task_ids[{i}] = {tid[i]} is not an index into {split}.task_names "
            f"(which has {len(names)} names)"
        )
    for name in ("outputs", "jacobians", "labels"):
        arr = getattr(feats, name)
        if name == "labels" and loss == "cross_entropy":
            continue  # checked as integers below
        try:
            i = _first_bad_row(arr, lambda c: ~np.isfinite(c))
        except TypeError:
            raise TypeError(f"{split}.{name} must be numeric, got dtype {np.asarray(arr[:1]).dtype}")
        if i is not None:
            raise ValueError(f"{split}.{name} has a NaN or inf value at sample index {i}")

    C = 1 if feats.outputs.ndim == 1 else feats.outputs.shape[1]
    labels = np.asarray(feats.labels)
    if loss == "cross_entropy":
        if feats.outputs.ndim != 2 or C < 2:
            raise ValueError(
                f"loss='cross_entropy' needs {split}.outputs of shape (n, C) with C >= 2 logits, "
                f"got {feats.outputs.shape}; use loss='logistic' for a scalar output"
            )
        if labels.ndim != 1:
            raise ValueError(
                f"loss='cross_entropy' needs {split}.labels of shape (n,) (class indices), "
                f"got {labels.shape}"
            )
        if labels.dtype.kind == "f":  # float labels are fine when they hold whole numbers
            ok = np.isfinite(labels) & (labels == np.round(labels))
        elif labels.dtype.kind in "iub":
            ok = np.ones(len(labels), dtype=bool)
        else:
            raise TypeError(f"{split}.labels must be integer class indices, got dtype {labels.dtype}")
        ok &= (labels >= 0) & (labels < C)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{split}.labels[{i}] = {labels[i]} is not a class index in [0, {C}) "
                f"(the outputs have C = {C} logits)"
            )
    elif loss == "logistic":
        if C != 1:
            raise ValueError(
                f"loss='logistic' needs a scalar output per sample, but {split}.outputs has shape "
                f"{feats.outputs.shape}; use loss='cross_entropy' for logits"
            )
        flat = labels.reshape(len(labels), -1)
        if flat.shape[1] != 1:
            raise ValueError(f"loss='logistic' needs {split}.labels of shape (n,), got {labels.shape}")
        ok = (flat[:, 0] == 0) | (flat[:, 0] == 1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"loss='logistic' needs {split}.labels in {{0, 1}}, but {split}.labels[{i}] = {flat[i, 0]}"
            )
    else:  # squared
        want = (len(labels),) if feats.outputs.ndim == 1 else tuple(feats.outputs.shape)
        if labels.shape != want and not (feats.outputs.ndim == 1 and labels.shape == (len(labels), 1)):
            raise ValueError(
                f"loss='squared' needs {split}.labels shaped like the outputs {want}, got {labels.shape}"
            )


def _check_subsets(subsets, names: list) -> np.ndarray:
    S = check_training_subsets(subsets)
    if S.shape[1] != len(names):
        raise ValueError(
            f"subsets has {S.shape[1]} columns but the source split has K = {len(names)} tasks "
            f"({names[:5]}{'...' if len(names) > 5 else ''}); one column per source task"
        )
    return S


def _check_scalar(name: str, value, *, positive=True, integer=False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------


class _Problem:
    """Source features on the solver's device/dtype, plus per-task curvature at z = 0."""

    def __init__(self, feats, names, loss, weighting, lam, device, dtype, preconditioner):
        self.loss = _LOSS_IMPL[loss]
        self.weighting = weighting
        self.lam = float(lam)
        self.names = names
        J = _to_tensor(feats.jacobians, device, dtype)
        n = J.shape[0]
        self.C = 1 if J.dim() == 2 else J.shape[1]
        self.n, self.k = n, J.shape[-1]
        self.Jf = J.reshape(n * self.C, self.k)
        self.f0 = _to_tensor(feats.outputs, device, dtype).reshape(n, self.C, 1)
        self.y = _labels_tensor(feats, loss, self.C, device, dtype)
        self.task_ids = torch.as_tensor(np.asarray(feats.task_ids).astype(np.int64), device=device)
        self.counts = np.bincount(np.asarray(feats.task_ids).astype(np.int64), minlength=len(names))
        self.diagonal = preconditioner == "diagonal"
        self.task_hessians = self._task_hessians()

    def _task_hessians(self) -> torch.Tensor:
        """sum over a task's samples of J_i^T H_i(f0_i) J_i, for every task: (K, k, k), or only
        its diagonal (K, k) for the diagonal preconditioner."""
        n, C, k = self.n, self.C, self.k
        _, curv = self.loss.grad_and_curv(self.f0, self.y)
        shape = (len(self.names), k) if self.diagonal else (len(self.names), k, k)
        out = torch.zeros(shape, dtype=self.Jf.dtype, device=self.Jf.device)
        J3 = self.Jf.view(n, C, k)
        for t in range(len(self.names)):
            idx = torch.nonzero(self.task_ids == t).flatten()
            if len(idx) == 0:
                continue
            Jt = J3[idx]
            if curv is None:  # squared: identity curvature
                Jw = Jt
            else:
                Jw = Jt * curv[idx]  # (n_t, C, k) * (n_t, C, 1)
            if self.diagonal:
                out[t] = (Jw * Jt).sum((0, 1))
            else:
                out[t] = Jw.reshape(-1, k).T @ Jt.reshape(-1, k)
            if self.loss is _CrossEntropy:  # minus the rank-one part p p^T of the softmax Hessian
                Q = (Jt * curv[idx]).sum(1)  # (n_t, k)
                out[t] -= (Q * Q).sum(0) if self.diagonal else Q.T @ Q
        return out

    def subset_weights(self, S: np.ndarray) -> torch.Tensor:
        """Per-sample weight of each task under each subset: (m, K)."""
        return torch.as_tensor(subset_sample_weights(S, self.counts, self.weighting)).to(
            self.Jf.dtype
        ).to(self.Jf.device)


def subset_sample_weights(subsets: np.ndarray, task_counts: np.ndarray, weighting: str = "task") -> np.ndarray:
    """The weight a_st that one sample of task t carries in subset s's objective: ``(m, K)``.

    ``weighting="task"``: ``s_t / (|s| n_t)`` (the mean over selected tasks of each task's mean
    loss); ``weighting="sample"``: ``s_t / sum_u s_u n_u`` (the mean over all selected samples).
    Each row sums, over samples, to 1.
    """
    S = np.asarray(subsets, dtype=np.float64)
    counts = np.asarray(task_counts, dtype=np.float64)
    if weighting == "task":
        with np.errstate(divide="ignore", invalid="ignore"):
            w = S / (S.sum(1, keepdims=True) * counts[None, :])
    elif weighting == "sample":
        w = S / (S @ counts)[:, None]
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return np.where(S > 0, w, 0.0)


def _to_tensor(arr, device, dtype) -> torch.Tensor:
    """The array as a tensor; read-only (memory-mapped) arrays are copied into memory first.
    The solver never writes into these tensors, so sharing a writable array is safe."""
    arr = np.asarray(arr)
    if not arr.flags.writeable:
        arr = np.array(arr, dtype=torch.empty((), dtype=dtype).numpy().dtype)
    return torch.as_tensor(arr, device=device).to(dtype)


def _labels_tensor(feats, loss, C, device, dtype) -> torch.Tensor:
    labels = np.asarray(feats.labels)
    n = len(labels)
    if loss == "cross_entropy":
        return torch.as_tensor(labels.astype(np.int64), device=device)
    return torch.as_tensor(labels.reshape(n, -1).astype(np.float64), device=device).to(dtype).reshape(n, C, 1)


class _Preconditioner:
    """Every subset's Hessian at z = 0, sum_t a_st H_t + lam I, ready to apply its inverse.

    ``cholesky``: the full k x k matrices, factored once per batch (m k^3 / 3 flops);
    ``diagonal``: their diagonals only (for very large k, where m k^2 numbers do not fit)."""

    def __init__(self, prob, A):
        m, k, K = A.shape[0], prob.k, len(prob.names)
        if prob.diagonal:
            self.L = None
            self.D = A @ prob.task_hessians + prob.lam  # (m, k)
            return
        M = (A @ prob.task_hessians.reshape(K, k * k)).reshape(m, k, k)
        M.diagonal(dim1=1, dim2=2).add_(prob.lam)
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info > 0).any()):  # positive definiteness lost to round-off: add jitter
            diag = M.diagonal(dim1=1, dim2=2)
            diag.add_(1e-6 * diag.abs().amax(-1, keepdim=True) + prob.lam)
            L = torch.linalg.cholesky(M)
        self.L = L

    def select(self, keep: torch.Tensor) -> "_Preconditioner":
        """The preconditioners of the subsets (columns) in ``keep``."""
        out = object.__new__(_Preconditioner)
        out.L = None if self.L is None else self.L[keep]
        out.D = None if self.L is not None else self.D[keep]
        return out

    def apply(self, R: torch.Tensor) -> torch.Tensor:
        """M_j^{-1} r_j for every column j of R (k, m)."""
        if self.L is None:
            return R / self.D.T
        # Two batched triangular solves: much faster than torch.cholesky_solve for many small systems.
        Y = torch.linalg.solve_triangular(self.L, R.T.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(self.L.mT, Y, upper=True).squeeze(-1).T


def _objective(prob, P, W, Z):
    """Per-subset objective (m,): weighted loss of predictions P (n, C, m) + lam/2 |z|^2."""
    return (W * prob.loss.value(P, prob.y)).sum(0) + 0.5 * prob.lam * (Z * Z).sum(0)


def _gradient(prob, P, W, Z):
    """Gradient (k, m) and the weighted loss curvature that Hessian-vector products need."""
    G, curv = prob.loss.grad_and_curv(P, prob.y)
    W = W.unsqueeze(1)
    g = prob.Jf.T @ (G * W).reshape(prob.n * prob.C, -1) + prob.lam * Z
    return g, prob.loss.weighted_curvature(curv, W)


def _hessian_vec(prob, state, V):
    """Exact Hessian-vector products for every column of V (k, m); also returns J V."""
    JV = prob.Jf @ V
    HU = prob.loss.hvp(state, JV.view(prob.n, prob.C, -1))
    return prob.Jf.T @ HU.reshape(prob.n * prob.C, -1) + prob.lam * V, JV


def _select_state(state, keep):
    if isinstance(state, tuple):
        return tuple(x[..., keep] for x in state)
    return state[..., keep]


def _pcg(prob, state, precond, g, forcing, max_cg):
    """Preconditioned CG on H d = -g, column by column (columns stop at their own tolerance).

    Returns d (k, m) and J d (nC, m), accumulated from the J p products CG computes anyway."""
    b = -g
    x = torch.zeros_like(b)
    Jx = torch.zeros(prob.n * prob.C, b.shape[1], dtype=b.dtype, device=b.device)
    r = b.clone()
    z = precond.apply(r)
    p = z.clone()
    rz = (r * z).sum(0)
    target = forcing * b.norm(dim=0)
    live = torch.ones(b.shape[1], dtype=torch.bool, device=b.device)
    one = torch.ones((), dtype=b.dtype, device=b.device)
    for _ in range(max_cg):
        Hp, Jp = _hessian_vec(prob, state, p)
        pHp = (p * Hp).sum(0)
        alpha = torch.where(live & (pHp > 0), rz / torch.where(pHp > 0, pHp, one), 0 * one)
        x += alpha * p
        Jx += alpha * Jp
        r -= alpha * Hp
        live &= r.norm(dim=0) > target
        if not bool(live.any()):
            break
        z = precond.apply(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(live & (rz > 0), rz_new / torch.where(rz > 0, rz, one), 0 * one)
        p = z + beta * p
        rz = rz_new
    return x, Jx


def _line_search(prob, P, W, Z, d, Jd, g, f_cur):
    """Backtracking (Armijo) step per column. Returns steps t (m,), 0 where none was found, and
    the objective at the accepted step.

    Trial objectives need no matrix product: predictions move along the precomputed J d."""
    slope = (g * d).sum(0)
    t = torch.ones_like(slope)
    ok = torch.zeros_like(slope, dtype=torch.bool)
    f_acc = f_cur.clone()
    n, C = prob.n, prob.C
    # Slack of a few ulps of the objective, so round-off near the optimum cannot block a step.
    slack = 64 * torch.finfo(P.dtype).eps * f_cur.abs()
    for trial in range(40):
        Pt = P + Jd if trial == 0 else P + t * Jd  # the full Newton step is tried first
        f_new = _objective(prob, Pt.view(n, C, -1), W, Z + t * d)
        accept = ~ok & (f_new <= f_cur + 1e-4 * t * slope + slack)
        f_acc = torch.where(accept, f_new, f_acc)
        ok = ok | accept
        if bool(ok.all()):
            break
        t = torch.where(ok, t, 0.5 * t)
    return torch.where(ok, t, torch.zeros_like(t)), f_acc


def _solve_batch(prob, S: np.ndarray, tol: float, max_iter: int, max_cg: int, Z0=None, gnorm0=None):
    """Newton-CG for one batch of subsets. Returns Z (k, m), converged, n_iter, grad norms and
    the gradient norms at z = 0 (the reference of the relative tolerance).

    ``Z0`` (k, m) warm-starts the iteration; ``gnorm0`` then gives the reference norms."""
    dev, dt = prob.Jf.device, prob.Jf.dtype
    m, k, n, C = S.shape[0], prob.k, prob.n, prob.C
    A = prob.subset_weights(S)  # (m, K)
    W_all = A[:, prob.task_ids].T.contiguous()  # (n, m): sample weights under each subset
    # Preconditioners: the exact Hessian at z = 0 of every subset, factored once.
    precond = _Preconditioner(prob, A)

    if Z0 is None:
        Z = torch.zeros(k, m, dtype=dt, device=dev)
        P = prob.f0.reshape(n * C, 1).expand(n * C, m).clone()
    else:
        Z = Z0.to(device=dev, dtype=dt).clone()
        P = prob.f0.reshape(n * C, 1) + prob.Jf @ Z
        gnorm0 = torch.as_tensor(gnorm0, device=dev).to(dt).clamp_min(torch.finfo(dt).tiny)
    converged = np.zeros(m, dtype=bool)
    n_iter = np.zeros(m, dtype=np.int64)
    gnorm = np.zeros(m)
    active = torch.arange(m, device=dev)
    g_prev = torch.full((m,), float("inf"), dtype=dt, device=dev)
    floor = math.sqrt(torch.finfo(dt).eps)  # below this relative gradient, round-off can dominate
    f_cur = _objective(prob, P.view(n, C, m), W_all, Z)
    for it in range(max_iter + 1):
        full = len(active) == m  # while every subset is active, work on views, not copies
        Pa, Wa, Za = (P, W_all, Z) if full else (P[:, active], W_all[:, active], Z[:, active])
        g, state = _gradient(prob, Pa.view(n, C, -1), Wa, Za)
        gn = g.norm(dim=0)
        if gnorm0 is None:
            gnorm0 = gn.clamp_min(torch.finfo(dt).tiny)
        act_np = active.cpu().numpy()
        gnorm[act_np] = gn.cpu().numpy()
        done = gn <= tol * gnorm0[active]
        converged[act_np[done.cpu().numpy()]] = True
        # Newton shrinks the gradient many-fold per step near the optimum; a column that no longer
        # halves it there has hit the precision floor of its dtype: stop it (not converged).
        stalled = ~done & (gn > 0.5 * g_prev[active]) & (gn <= floor * gnorm0[active])
        g_prev[active] = gn
        keep = ~done & ~stalled
        if it == max_iter or not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, g, Pa, Wa, Za = active[keep], g[:, keep], Pa[:, keep], Wa[:, keep], Za[:, keep]
            state = _select_state(state, keep)
            full = False
        # Inexact Newton: CG only as accurate as the current gradient warrants.
        forcing = torch.clamp(torch.sqrt(g.norm(dim=0) / gnorm0[active]), max=0.5)
        d, Jd = _pcg(prob, state, precond if full else precond.select(active), g, forcing, max_cg)
        t, f_new = _line_search(prob, Pa, Wa, Za, d, Jd, g, f_cur if full else f_cur[active])
        if full:
            f_cur = f_new
            Z.add_(t * d)
            P.add_(Jd if bool((t == 1).all()) else t * Jd)
        else:
            f_cur[active] = f_new
            Z[:, active] = Za + t * d
            P[:, active] = Pa + t * Jd
        stepped = t > 0
        n_iter[active.cpu().numpy()] += stepped.cpu().numpy()
        if not bool(stepped.all()):  # no descent possible (precision floor): stop these columns
            active = active[stepped]
            if len(active) == 0:
                break
    return Z, converged, n_iter, gnorm, gnorm0.cpu().numpy()


def _resolve(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg):
    if not isinstance(source, HarvestedFeatures):
        raise TypeError(f"source must be a HarvestedFeatures, got {type(source).__name__}")
    if loss is None:
        loss = default_loss(source.mode)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    _check_scalar("lam", lam)
    if dtype == "auto":
        dtypes = (torch.float32, torch.float64)
    elif dtype in (torch.float32, torch.float64):
        dtypes = (dtype,)
    else:
        raise ValueError(f'dtype must be "auto", torch.float32 or torch.float64, got {dtype!r}')
    if tol is not None:
        _check_scalar("tol", tol)
    tols = {dt: _DEFAULT_TOL[dt] if tol is None else float(tol) for dt in dtypes}
    _check_scalar("max_iter", max_iter, integer=True)
    if batch_size is not None:
        _check_scalar("batch_size", batch_size, integer=True)
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    if preconditioner == "auto":
        # Full k x k preconditioners while K task matrices plus 16 subsets' factors fit in 1 GiB,
        # and while k <= n C: beyond that a factor costs more to apply than a Hessian product.
        K = len(_task_names(source))
        itemsize = torch.finfo(dtypes[0]).bits // 8
        k, nC = source.proj_dim, source.n_samples * (1 if source.outputs.ndim == 1 else source.outputs.shape[1])
        fits = k**2 * itemsize * (K + 16) <= _MEMORY_BUDGET
        preconditioner = "cholesky" if fits and k <= nC else "diagonal"
    if max_cg is None:
        max_cg = 50 if preconditioner == "cholesky" else 1000
    _check_scalar("max_cg", max_cg, integer=True)
    return _Settings(loss, weighting, float(lam), dtypes, tols, max_iter, max_cg, preconditioner)


@dataclass
class _Settings:
    loss: str
    weighting: str
    lam: float
    dtypes: tuple  # (float32, float64) for dtype="auto": float64 re-solves what float32 cannot
    tols: dict
    max_iter: int
    max_cg: int
    preconditioner: str


class _Solver:
    """Solves batches of subsets in the first dtype; with dtype="auto", subsets that float32
    cannot bring to tolerance are re-solved in float64, warm-started from the float32 iterate."""

    def __init__(self, source, names, cfg: _Settings, device):
        self.source, self.names, self.cfg, self.device = source, names, cfg, device
        self.problems = {}
        self.n_refined = 0

    def problem(self, dtype) -> _Problem:
        if dtype not in self.problems:  # the float64 copy is only built when it is needed
            cfg = self.cfg
            self.problems[dtype] = _Problem(
                self.source, self.names, cfg.loss, cfg.weighting, cfg.lam, self.device, dtype, cfg.preconditioner
            )
        return self.problems[dtype]

    def solve(self, S: np.ndarray):
        """Z (k, m) in float64, converged, n_iter, gradient norms for one batch of subsets."""
        cfg = self.cfg
        first = cfg.dtypes[0]
        Z, conv, iters, gn, g0 = _solve_batch(self.problem(first), S, cfg.tols[first], cfg.max_iter, cfg.max_cg)
        Z = Z.to(torch.float64)
        if len(cfg.dtypes) > 1 and not conv.all():
            bad = np.flatnonzero(~conv)
            idx = torch.as_tensor(bad, device=Z.device)
            Z2, c2, it2, gn2, _ = _solve_batch(
                self.problem(cfg.dtypes[1]), S[bad], cfg.tols[cfg.dtypes[1]], cfg.max_iter, cfg.max_cg,
                Z0=Z[:, idx], gnorm0=g0[bad],
            )
            Z[:, idx] = Z2.to(torch.float64)
            conv[bad], gn[bad] = c2, gn2
            iters[bad] += it2
            self.n_refined += len(bad)
        return Z, conv, iters, gn


def _prepare(source, subsets, loss):
    """Validate source + subsets, then build the solver problem (the only expensive setup)."""
    _check_split(source, "source", loss)
    names = _task_names(source)
    S = _check_subsets(subsets, names)
    counts = np.bincount(np.asarray(source.task_ids).astype(np.int64), minlength=len(names))
    missing = np.flatnonzero((counts == 0) & S.any(axis=0))
    if len(missing):
        t = int(missing[0])
        row = int(np.flatnonzero(S[:, t])[0])
        raise ValueError(
            f"source task {names[t]!r} (column {t}) has no samples in the source split, but "
            f"subset row {row} selects it; harvest samples for it or drop the column"
        )
    return S, names


def _auto_batch(m, n, C, k, n_target, diagonal):
    kk = 0 if diagonal else 2 * k * k  # one preconditioner and its factor per subset
    per_subset = 8 * (7 * n * C + 2 * n + kk + 12 * k + 3 * n_target * C)  # float64 worst case
    return int(max(1, min(m, _MEMORY_BUDGET // max(1, per_subset))))


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="subset")


def _warn_unconverged(converged, grad_norms):
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
    """Solve the linearized fine-tuning problem (eq. 9) for every subset row; see :func:`gradex`.

    Returns the solutions Z*_s as an ``(m, k)`` array with per-subset convergence facts.
    """
    cfg = _resolve(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg)
    loss = cfg.loss
    S, names = _prepare(source, subsets, loss)
    solver = _Solver(source, names, cfg, device)
    prob = solver.problem(cfg.dtypes[0])
    m = S.shape[0]
    bs = batch_size or _auto_batch(m, prob.n, prob.C, prob.k, 0, prob.diagonal)
    Zs, conv, iters, gns = [], [], [], []
    bar = _progress(m, progress, "GradEx solve")
    for start in range(0, m, bs):
        Z, c, it, gn = solver.solve(S[start : start + bs])
        Zs.append(Z.T.cpu().numpy())
        conv.append(c), iters.append(it), gns.append(gn)
        if bar is not None:
            bar.update(len(c))
    if bar is not None:
        bar.close()
    out = SubsetSolutions(
        solutions=np.concatenate(Zs),
        converged=np.concatenate(conv),
        n_iter=np.concatenate(iters),
        grad_norms=np.concatenate(gns),
        loss=loss,
        weighting=weighting,
        lam=float(lam),
    )
    _warn_unconverged(out.converged, out.grad_norms)
    return out


class _Target:
    """Target features on the device, with the group-averaging matrix (T, n_t)."""

    def __init__(self, feats, loss, C, device, dtype):
        self.loss = _LOSS_IMPL[loss]
        J = _to_tensor(feats.jacobians, device, dtype)
        n = J.shape[0]
        self.n, self.C = n, C
        self.Jf = J.reshape(n * C, -1)
        self.f0 = _to_tensor(feats.outputs, device, dtype).reshape(n * C, 1)
        self.y = _labels_tensor(feats, loss, C, device, dtype)
        self.labels_np = np.asarray(feats.labels)
        names = _task_names(feats)
        tid = np.asarray(feats.task_ids).astype(np.int64)
        present = np.unique(tid)
        self.names = [names[t] for t in present] + ["all"]
        avg = np.zeros((len(present) + 1, n))
        for row, t in enumerate(present):
            avg[row, tid == t] = 1.0 / np.sum(tid == t)
        avg[-1] = 1.0 / n
        self.masks = [tid == t for t in present] + [np.ones(n, dtype=bool)]
        self.avg = torch.as_tensor(avg, device=device).to(dtype)

    def predictions(self, Z: torch.Tensor) -> torch.Tensor:
        return (self.f0 + self.Jf @ Z).view(self.n, self.C, -1)

    def evaluate(self, Z, want_accuracy, metric):
        P = self.predictions(Z)
        losses = (self.avg @ self.loss.value(P, self.y)).T.cpu().numpy()
        acc = None
        if want_accuracy and self.loss.predict_correct is not None:
            acc = (self.avg @ self.loss.predict_correct(P, self.y)).T.cpu().numpy()
        vals = None
        if metric is not None:
            Pn = P.cpu().numpy()
            vals = np.empty((Z.shape[1], len(self.names)))
            for j in range(Z.shape[1]):
                out = Pn[:, :, j] if self.C > 1 else Pn[:, 0, j]
                for g, mask in enumerate(self.masks):
                    vals[j, g] = float(metric(out[mask], self.labels_np[mask]))
        return losses, acc, vals


def gradex(
    source: HarvestedFeatures,
    target: HarvestedFeatures,
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
    accuracy: bool = True,
    metric: Optional[Callable[[np.ndarray, np.ndarray], float]] = None,
    keep_solutions: bool = False,
    progress: bool = False,
) -> GradExResult:
    """Estimate the target loss F^(s) of fine-tuning on each task subset, without retraining.

    For every row ``s`` of ``subsets`` (an ``(m, K)`` 0/1 array over the source tasks) this solves

        Z*_s = argmin_z  sum_t a_st sum_{i in T_t} loss(f0_i + J_i z, y_i) + lam/2 |z|^2

    on the ``source`` features (``a_st`` from :func:`subset_sample_weights`, set by
    ``weighting``), then returns the mean loss of ``f0 + J Z*_s`` on each target group.

    Parameters
    ----------
    source, target:
        Harvested features of the training (source) split and of the evaluation (target) split;
        both must have the same projection dimension k and output shape.
    subsets:
        ``(m, K)`` bool or 0/1 array, one column per name in ``source.task_names``.
    lam:
        Ridge strength lambda > 0 of the proximal term lambda/2 |z|^2 (the objective's loss part
        is a weighted mean, so lambda does not need to scale with the number of samples).
    loss:
        ``"cross_entropy"``, ``"logistic"`` or ``"squared"``; by default chosen from
        ``source.mode`` (logits -> cross_entropy, margin/logistic -> logistic,
        regression -> squared). The same loss is used on the target.
    weighting:
        ``"task"`` (each selected task weighs the same) or ``"sample"`` (each selected sample
        weighs the same).
    batch_size:
        subsets solved together; ``None`` picks the largest batch within ~1 GiB of working memory.
    max_iter, max_cg, tol:
        Newton steps, CG steps per Newton step (default 50 with the Cholesky preconditioner,
        1000 with the diagonal one), and the relative gradient-norm tolerance: stop when
        ``|grad| <= tol * |grad at z=0|`` (default 1e-8 for float64, 1e-5 for float32). Subsets
        that miss it are reported in ``converged`` and a :class:`GradExConvergenceWarning` is issued.
    preconditioner:
        ``"cholesky"``: each subset's exact Hessian at z = 0 (k x k, factored once);
        ``"diagonal"``: its diagonal only, for very large k; ``"auto"`` (default) picks Cholesky
        while K + 16 matrices of k x k fit in 1 GiB and k <= n C (source samples x outputs).
    device, dtype:
        where and in which precision to solve. ``dtype="auto"`` (default): float32 first (tolerance
        1e-5), then float64 (tolerance 1e-8) for the subsets float32 could not finish;
        ``torch.float64`` or ``torch.float32`` use one precision throughout. Target losses are
        always evaluated in float64.
    accuracy:
        also report classification accuracy per group (classification losses only).
    metric:
        optional callable ``metric(outputs, labels) -> float`` evaluated per subset and group on
        the linearized target outputs (``(n_g,)`` for scalar outputs, ``(n_g, C)`` for logits).
    keep_solutions:
        keep the ``(m, k)`` solutions in the result.
    progress:
        show a tqdm progress bar over subsets.
    """
    cfg = _resolve(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg)
    loss = cfg.loss
    if not isinstance(target, HarvestedFeatures):
        raise TypeError(f"target must be a HarvestedFeatures, got {type(target).__name__}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable metric(outputs, labels) -> float, got {metric!r}")
    if source.proj_dim != target.proj_dim:
        raise ValueError(
            f"source and target have different projection dims k ({source.proj_dim} vs "
            f"{target.proj_dim}); harvest both with the same projector"
        )
    if source.outputs.shape[1:] != target.outputs.shape[1:]:
        raise ValueError(
            f"source outputs have per-sample shape {source.outputs.shape[1:]} but target outputs "
            f"have {target.outputs.shape[1:]}; both splits need the same output mode"
        )
    if (
        source.mode != target.mode
        and source.mode in _MODE_TO_LOSS
        and target.mode in _MODE_TO_LOSS
        and _MODE_TO_LOSS[source.mode] != _MODE_TO_LOSS[target.mode]
    ):
        raise ValueError(
            f"source mode {source.mode!r} and target mode {target.mode!r} imply different losses; "
            "harvest both splits in the same output mode"
        )
    _check_split(target, "target", loss)
    S, names = _prepare(source, subsets, loss)

    solver = _Solver(source, names, cfg, device)
    prob = solver.problem(cfg.dtypes[0])
    # Target losses in float64 always: F^ differences between subsets can be small.
    tgt = _Target(target, loss, prob.C, device, torch.float64)
    m = S.shape[0]
    bs = batch_size or _auto_batch(m, prob.n, prob.C, prob.k, tgt.n, prob.diagonal)
    parts = {key: [] for key in ("loss", "acc", "metric", "conv", "iter", "gn", "norm", "Z")}
    bar = _progress(m, progress, "GradEx")
    for start in range(0, m, bs):
        Z, c, it, gn = solver.solve(S[start : start + bs])
        lo, acc, vals = tgt.evaluate(Z, accuracy, metric)
        parts["loss"].append(lo)
        parts["acc"].append(acc)
        parts["metric"].append(vals)
        parts["conv"].append(c)
        parts["iter"].append(it)
        parts["gn"].append(gn)
        parts["norm"].append(Z.norm(dim=0).cpu().numpy())
        if keep_solutions:
            parts["Z"].append(Z.T.cpu().numpy())
        if bar is not None:
            bar.update(len(c))
    if bar is not None:
        bar.close()

    def cat(key):
        items = parts[key]
        return None if not items or items[0] is None else np.concatenate(items)

    result = GradExResult(
        losses=cat("loss"),
        target_names=tgt.names,
        subsets=S.copy(),
        converged=cat("conv"),
        n_iter=cat("iter"),
        grad_norms=cat("gn"),
        solution_norms=cat("norm"),
        loss=loss,
        weighting=weighting,
        lam=float(lam),
        accuracy=cat("acc"),
        metric_values=cat("metric"),
        solutions=cat("Z") if keep_solutions else None,
        extras={
            "tol": {str(k).replace("torch.", ""): v for k, v in cfg.tols.items()},
            "batch_size": bs,
            "dtype": dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
            "preconditioner": cfg.preconditioner,
            "float64_resolved": solver.n_refined if len(cfg.dtypes) > 1 else 0,
        },
    )
    _warn_unconverged(result.converged, result.grad_norms)
    return result
