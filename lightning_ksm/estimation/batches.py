"""The minibatches of the simulated run (``simulate(batches="run")``): each step reads only its batch.

The full-batch simulation evaluates every sample of the source at every simulated step, so one
simulated epoch costs O(n^2 / b) and the analysis grows as n^2. Here each subset draws batches as
training does: per epoch one permutation of all n samples, seeded and shared by every subset, each
subset taking its own samples in that order, ``b`` (the run's effective batch: batch x accumulation
x world size) per step, for the steps the subset gets in that epoch (:func:`.simulate.subset_steps`:
the recorded steps, kept). A step then costs O(b k) per subset: the rows of its batch are gathered
(``J[idx]``, idx ``(m, b)``) and multiplied in one batched product, ``f_B = f0_B + J_B z``,
gradient ``J_B^T g_B``.

Each sample's weight in its step is ``a_s,t(i) x n_s / |B|`` (``a``: its weight in the subset's
full-batch loss, :func:`.simulate.subset_weights`; ``n_s``: the subset's samples with a weight), so a
batch's gradient is an unbiased estimate of the full-batch one (the mean over the batch for
``weighting="sample"``); with one batch holding all of a subset's samples it is the full-batch
gradient exactly.
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
    """Per step ``t`` and subset ``j``: the samples ``idx[t, j]`` (``(T, m, b)``) of its batch and their
    weights ``weight[t, j]`` in its gradient (0 for padding and after the subset's last step)."""

    idx: torch.Tensor
    weight: torch.Tensor

    def gradient(self, src, readout: Optional[torch.Tensor]):
        """``gradient(Z, t) -> (g (k, a), q (T_r, a) or None)`` for the first ``a = Z.shape[1]`` subsets
        at step ``t``: only the rows of each subset's batch are evaluated."""
        J3 = src.Jf.view(src.n, src.C * src.k)
        C, k = src.C, src.k

        def grad(Z, t):
            a = Z.shape[1]
            idx, w = self.idx[t, :a], self.weight[t, :a]
            b = idx.shape[1]
            JB = J3[idx].view(a, b * C, k)
            P = src.f0[idx].view(a, b * C, 1) + torch.bmm(JB, Z.T.unsqueeze(2))
            y = src.y[idx]
            y = y.reshape(a * b) if y.dim() == 2 else y.reshape(a * b, C, 1)
            g = src.loss.grad_and_curv(P.view(a * b, C, 1), y)[0].view(a, b, C) * w[:, :, None]
            out = torch.bmm(g.view(a, 1, b * C), JB).view(a, k).T
            q = None if readout is None else torch.einsum("abct,abc->ta", readout[idx], g)
            return out, q
        return grad


def batch_plan(A: np.ndarray, task_ids: np.ndarray, steps: np.ndarray, per_epoch: np.ndarray, batch: int,
               seed: int, device, dtype) -> BatchPlan:
    """The batches of subsets with per-task sample weights ``A`` (``(m, K)``), ``steps`` (m,) in all,
    ``per_epoch`` (``(m, E)``, :func:`epoch_steps`) of them in the recorded epochs, ``batch`` samples
    per step; epoch ``e`` orders the samples by permutation ``default_rng([seed, e])`` of all n."""
    task_ids = np.asarray(task_ids, dtype=np.int64)
    n, m = len(task_ids), len(A)
    T = int(steps.max())
    idx = np.zeros((T, m, batch), dtype=np.int64)
    weight = np.zeros((T, m, batch))
    members = A[:, task_ids] > 0  # (m, n)
    n_s = members.sum(1)
    done = np.zeros(m, dtype=np.int64)
    e = 0
    while np.any(done < steps):
        order = np.random.default_rng([seed, e]).permutation(n)
        for j in np.nonzero(done < steps)[0]:
            if n_s[j] == 0:  # no sample with a weight: its steps have a zero gradient
                done[j] = steps[j]
                continue
            mine = order[members[j, order]]
            full = -(-n_s[j] // batch)
            q = int(per_epoch[j, e]) if e < per_epoch.shape[1] else full
            q = min(q, int(steps[j] - done[j]))
            if q > full:  # more steps than batches of b (rounding up of a subset's share): spread evenly
                chunks = np.array_split(mine, q)
            else:  # batches of b, as the loader makes them (the last may be short); part of the data
                chunks = [mine[i * batch:(i + 1) * batch] for i in range(q)]
            for i, c in enumerate(chunks):
                t = done[j] + i
                idx[t, j, :len(c)] = c
                weight[t, j, :len(c)] = A[j, task_ids[c]] * n_s[j] / len(c)
            done[j] += q
        e += 1
    return BatchPlan(torch.as_tensor(idx, device=device), torch.as_tensor(weight, device=device, dtype=dtype))
