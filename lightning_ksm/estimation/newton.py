"""The batched Newton-CG kernel: one batch of subsets' linearized problems, solved together.

Newton's method with conjugate gradients (exact Hessian-vector products), preconditioned per
subset by its Hessian at ``z = 0``; that Hessian is a weighted sum of K per-task matrices computed
once (:class:`Problem`), so every preconditioner costs one small Cholesky factorization.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import WEIGHTINGS as _WEIGHTINGS
from .losses import LOSS_IMPL

__all__ = ["WEIGHTINGS", "LinearizedSource", "Problem", "labels_tensor", "solve_batch", "subset_sample_weights", "to_tensor"]

WEIGHTINGS = _WEIGHTINGS  # the vocabulary is declared in config


class LinearizedSource:
    """The source split laid out for the linearized model on a device/dtype: the flat Jacobians
    ``Jf`` (n C, k), the outputs ``f0`` (n, C, 1), the labels ``y``, and the per-task sample counts."""

    def __init__(self, feats, loss, device, dtype, n_tasks: int):
        self.loss = LOSS_IMPL[loss]
        J = to_tensor(feats.jacobians, device, dtype)
        n = J.shape[0]
        self.C = 1 if J.dim() == 2 else J.shape[1]
        self.n, self.k = n, J.shape[-1]
        self.Jf = J.reshape(n * self.C, self.k)
        self.f0 = to_tensor(feats.outputs, device, dtype).reshape(n, self.C, 1)
        self.y = labels_tensor(feats, loss, self.C, device, dtype)
        self.counts = np.bincount(np.asarray(feats.task_ids).astype(np.int64), minlength=n_tasks)


class Problem(LinearizedSource):
    """Source features on the solver's device/dtype, plus per-task curvature at z = 0."""

    def __init__(self, feats, names, loss, weighting, lam, device, dtype, preconditioner):
        super().__init__(feats, loss, device, dtype, len(names))
        self.weighting = weighting
        self.lam = float(lam)
        self.names = names
        self.task_ids = torch.as_tensor(np.asarray(feats.task_ids).astype(np.int64), device=device)
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
            if self.loss is LOSS_IMPL["cross_entropy"]:  # minus the rank-one part p p^T of the softmax Hessian
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


def to_tensor(arr, device, dtype) -> torch.Tensor:
    """The array as a tensor; read-only (memory-mapped) arrays are copied into memory first.
    The solver never writes into these tensors, so sharing a writable array is safe."""
    arr = np.asarray(arr)
    if not arr.flags.writeable:
        arr = np.array(arr, dtype=torch.empty((), dtype=dtype).numpy().dtype)
    return torch.as_tensor(arr, device=device).to(dtype)


def labels_tensor(feats, loss, C, device, dtype) -> torch.Tensor:
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


def solve_batch(prob, S: np.ndarray, tol: float, max_iter: int, max_cg: int, Z0=None, gnorm0=None):
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
