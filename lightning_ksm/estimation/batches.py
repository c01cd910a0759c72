"""The minibatches of the simulated run (``simulate(batches="run")``): each step reads only its batch.

The full-batch simulation evaluates every sample of the source at every simulated step, so one
simulated epoch costs O(n^2 / b) and the analysis grows as n^2. Here the subsets draw batches as
training does, and an epoch costs O(n): per epoch one permutation of all n samples, seeded and
shared by every subset; a subset whose data makes ``Q = ceil(n_s / b)`` batches of the run's
effective batch ``b`` (batch x accumulation x world size) cuts that order into ``Q`` equal windows
and takes, at its i-th step of the epoch, its own samples in window i (on average ``n_s / Q <= b``
of them; the exact count varies a little from batch to batch, where a loader's is exactly ``b``).
It takes the steps it gets in that epoch (:func:`.simulate.subset_steps`, kept: where the run drew
part of the data, the first windows only). Subsets with the same windows (the same steps and
``Q`` in every epoch) step together: one step gathers the window's rows once and multiplies them
with all those subsets' parameters in one matrix product, ``f_W = f0_W + J_W Z``, gradient
``J_W^T G``, so a step costs O(n / Q x k) per subset instead of O(n k).

Each sample weighs ``a_s,t x n_s / |B|`` in its batch ``B`` (``a``: its weight in the subset's
full-batch loss, :func:`.simulate.subset_weights`; ``n_s``: the subset's samples with a weight),
so a batch's gradient is an unbiased estimate of the full-batch one (the mean over the batch for
``weighting="sample"``); one window holding all the data (``b >= n_s``) is the full-batch run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from .epochs import EpochDraws

__all__ = ["BatchPlan", "batch_plan", "effective_batch", "epoch_steps"]


def effective_batch(run: Mapping, draws: Optional[EpochDraws]) -> Optional[int]:
    """Samples per optimizer step of the watched run: batch x accumulation x world size, or, without a
    recorded batch size, what the recorded epochs drew per step; None when neither is known."""
    b = int(run.get("batch_size") or 0) * int(run.get("accumulate_grad_batches") or 1) * int(run.get("world_size") or 1)
    if b > 0:
        return b
    if draws is not None and draws.steps.sum() > 0:
        live = draws.steps > 0
        return int(np.max(-(-draws.total[live] // draws.steps[live])))
    return None


def epoch_steps(run: Mapping, n_s: np.ndarray, draws: Optional[EpochDraws], subsets: np.ndarray,
                batch: int) -> np.ndarray:
    """``(m, E)`` steps of each subset in each recorded epoch (the split of
    :func:`.simulate.subset_steps` per epoch); ``(m, 0)`` for a step-based run (epochs of
    ``ceil(n_s / batch)`` steps until the subset's steps are done)."""
    n_s = np.asarray(n_s, dtype=np.int64)
    if not run.get("epoch_based"):
        return np.zeros((len(n_s), 0), dtype=np.int64)
    if draws is not None:
        total = np.maximum(draws.total, 1)
        return -(-(draws.steps[None, :] * draws.subset_draws(subsets)) // total[None, :])
    epochs = int(run.get("epochs") or 0)
    return np.repeat(np.maximum(1, -(-n_s // batch))[:, None], epochs, axis=1)


@dataclass
class BatchPlan:
    """The batches of a group of subsets, as windows of a shared order: ``orders`` (E, n) the epochs'
    permutations; per window ``t``: ``windows[t] = (epoch, start, end)``, ``mult[t]`` (m,) the factor
    ``n_s / |B|`` of the batch it belongs to in each subset (0: none), ``stepping[t]`` (m,) the
    subsets whose batch ends with it, ``running[t]`` how many subsets (a prefix) still run; ``W``
    (n, m) each sample's weight in each subset's full-batch loss; ``perm``: the subsets' order here
    (by their last window, decreasing) as positions in the order they were given."""

    orders: torch.Tensor
    windows: list
    mult: torch.Tensor
    stepping: torch.Tensor
    running: np.ndarray
    W: torch.Tensor
    perm: np.ndarray
    reduced: bool = False  # the variance reduced (simulate_batches="reduced")

    def gradient(self, src, readout: Optional[torch.Tensor]):
        """``gradient(Z, t) -> (g (k, a), q (T_r, a) or None)``: window ``t``'s part of the gradient of
        the first ``a = Z.shape[1]`` subsets' batches; only the window's rows are evaluated, for all
        subsets in one matrix product. With ``reduced``, the variance reduced (SVRG): each epoch
        takes a full-batch gradient at its starting point ``Z_ref``, and a batch's gradient becomes
        ``g_B(Z) - g_B(Z_ref) + g(Z_ref)``, the full-batch gradient up to the batch's noise in the
        change since the epoch began."""
        J2 = src.Jf.view(src.n, src.C * src.k)
        C, k = src.C, src.k
        epoch = {}  # the epoch's rows in its order, gathered once (a window is then a slice)
        reduced = self.reduced

        def part(s0, s1, Z, w):  # (J_W^T (g w), readout's q, g w) of rows s0:s1 at Z
            L, a = s1 - s0, Z.shape[1]
            JW = epoch["J"][s0:s1].view(L * C, k)
            P = epoch["f0"][s0:s1] + (JW @ Z).view(L, C, a)
            g = src.loss.grad_and_curv(P, epoch["y"][s0:s1])[0] * w[:, None, :]
            q = None if readout is None else torch.einsum("nct,nca->ta", epoch["r"][s0:s1], g)
            return JW, g, q

        def grad(Z, t):
            a = Z.shape[1]
            e, s0, s1 = self.windows[t]
            if epoch.get("e") != e:
                order = self.orders[e]
                epoch.update(e=e, J=J2[order], f0=src.f0[order], y=src.y[order], W=self.W[order],
                             r=None if readout is None else readout[order])
                if reduced:  # the epoch's reference point and its full-batch gradient
                    epoch["ref"] = Z.clone()
                    epoch["full"], epoch["qfull"] = 0.0, 0.0
                    for c0 in range(0, src.n, 4096):
                        c1 = min(src.n, c0 + 4096)
                        JW, g, q = part(c0, c1, Z, epoch["W"][c0:c1, :a])
                        epoch["full"] = epoch["full"] + JW.T @ g.reshape(-1, a)
                        epoch["qfull"] = epoch["qfull"] + (0.0 if q is None else q)
            w = epoch["W"][s0:s1, :a] * self.mult[t, :a]
            if not reduced:
                JW, g, q = part(s0, s1, Z, w)
                return JW.T @ g.reshape(-1, a), q
            JW, g, q = part(s0, s1, torch.cat([Z, epoch["ref"][:, :a]], 1), torch.cat([w, w], 1))
            g = g[:, :, :a] - g[:, :, a:]
            ends = self.stepping[t, :a].to(Z.dtype)  # the reference's full gradient, once per step
            out = JW.T @ g.reshape(-1, a) + epoch["full"][:, :a] * ends
            if q is not None:
                q = q[:, :a] - q[:, a:] + epoch["qfull"][:, :a] * ends
            return out, q
        return grad


def batch_plan(A: np.ndarray, task_ids: np.ndarray, steps: np.ndarray, per_epoch: np.ndarray, batch: int,
               seed: int, device, dtype) -> BatchPlan:
    """The batches of subsets with per-task sample weights ``A`` (``(m, K)``), ``steps`` (m,) in all,
    ``per_epoch`` (``(m, E)``, :func:`epoch_steps`) of them in the recorded epochs (then epochs of
    ``ceil(n_s / batch)``). Epoch ``e`` orders the samples by the permutation ``default_rng([seed,
    e])`` of all n, cut into ``U`` equal windows, ``U`` the most batches any subset makes of its data
    that epoch; a subset that makes ``Q`` batches ends its i-th at window ``(i + 1) U // Q``."""
    task_ids = np.asarray(task_ids, dtype=np.int64)
    n, m = len(task_ids), len(A)
    W = A[:, task_ids].T  # (n, m)
    member = W > 0
    n_s = member.sum(0)
    full = np.maximum(1, -(-n_s // batch))
    steps = np.asarray(steps, dtype=np.int64)
    done = np.zeros(m, dtype=np.int64)
    orders, windows, mult, stepping = [], [], [], []
    e = 0
    while np.any(done < steps):
        q = per_epoch[:, e] if e < per_epoch.shape[1] else full
        q = np.minimum(q, steps - done)
        Q = np.maximum(full, q)  # more steps than batches (a share rounded up): smaller batches
        U = int(Q[q > 0].max())
        order = np.random.default_rng([seed, e]).permutation(n)
        bounds = np.arange(U + 1) * n // U
        cum = np.vstack([np.zeros((1, m), dtype=np.int64), np.cumsum(member[order], axis=0)])  # (n + 1, m)
        mu, st = np.zeros((U, m)), np.zeros((U, m), dtype=bool)
        for j in np.nonzero(q > 0)[0]:
            ends = (np.arange(1, q[j] + 1) * U) // Q[j]  # window index after each batch
            starts = np.concatenate([[0], ends[:-1]])
            size = cum[bounds[ends], j] - cum[bounds[starts], j]
            mu[:ends[-1], j] = np.repeat(n_s[j] / np.maximum(size, 1), ends - starts)
            st[ends - 1, j] = True
        orders.append(order)
        windows += [(e, int(bounds[u]), int(bounds[u + 1])) for u in range(U)]
        mult.append(mu)
        stepping.append(st)
        done += q
        e += 1
    mult, stepping = np.concatenate(mult), np.concatenate(stepping)
    last = np.array([np.nonzero(stepping[:, j])[0].max() if stepping[:, j].any() else -1 for j in range(m)])
    perm = np.argsort(-last, kind="stable")  # subsets that run longer first: the running ones are a prefix
    running = (last[perm][None, :] >= np.arange(len(windows))[:, None]).sum(1)
    return BatchPlan(torch.as_tensor(np.stack(orders), device=device), windows,
                     torch.as_tensor(mult[:, perm], device=device, dtype=dtype),
                     torch.as_tensor(stepping[:, perm], device=device), running,
                     torch.as_tensor(W[:, perm], device=device, dtype=dtype), perm)
