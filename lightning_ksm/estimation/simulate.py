"""The estimator that follows the watched run: the user's optimizer simulated on the linearized model.

Around W0 the model is ``f(x) ~ f0(x) + J(x) z`` (the harvested, projected Jacobians; see
:mod:`.estimate`). Instead of solving a converged proximal problem, :func:`simulate` runs, for every
subset ``s`` at once, the optimizer of the recorded training run on that linearized model:

- the same optimizer family (SGD with momentum / Nesterov, Adam / AdamW with the recorded betas
  and eps), the recorded learning rate and its schedule, the recorded (decoupled) weight decay,
  applied to the weight change only (the W0 part of a decay towards zero is not representable in
  ``z`` and is left out);
- the number of steps each subset would get: a step-based run (``max_steps``) gives every subset
  the recorded steps; an epoch-based run gives, per recorded epoch, the run's steps in proportion to
  the subset's share of the samples drawn (:mod:`.epochs`; without per-epoch records
  ``epochs x ceil(n_s / (batch_size x accumulation x world_size))``), growing with the subset's
  data; a recorded per-step schedule is stretched over each subset's steps;
- ``batches="full"``: full-batch gradients of the subset's weighted mean loss (``weighting``), one
  matrix product for all subsets per step (no minibatch noise: the estimate is of the mean over
  batch orders; O(n) per step, O(n^2 / b) per epoch); where the run drew only part of the data per
  epoch, each task's samples weighted by how often they were drawn. ``"run"``: the run's
  minibatches (:mod:`.batches`, O(n) per epoch), averaged over ``batch_orders``; ``"reduced"``:
  those with SVRG's variance reduction.

``adam_as`` chooses what an Adam-type optimizer becomes in the projected space:
``"adam"`` runs Adam coordinate-wise on z (the projected coordinates are random mixtures of the
parameters, so this is not the parameter-space Adam); ``"preconditioned"`` freezes the second
moment (the features then should have been harvested with the gradients divided by
``sqrt(sqrt(v) + eps)`` of the run's optimizer state, see docs/gradex.md) and runs the bias-corrected
first-moment EMA as momentum gradient descent.

**Exact readout.** When the source features carry the exact target readout
(:mod:`lightning_ksm.harvesting.readout`: ``c_i = J_i D gbar_j`` per sample and target column) and
the simulated optimizer is linear in the gradients (SGD with momentum, or Adam as
``"preconditioned"``), the first-order part of each target column's loss change is accumulated
exactly along the trajectory (the same momentum filter, decay and learning rates, applied to
``sum_i c_i g_i(t) w_i``), and only the rest (the curvature of the target loss) is read through the
projected target features: ``F^_j = L_j(f0 + Phi z) - gbar_proj_j . z + gbar_j . dW``.

``calibrate`` takes one free constant per target column from the observed all-tasks run (never from
a subset's outcome): ``"effect"`` scales every estimated change from W0, ``F^_j(s) - F_j(W0)``, by
the factor that makes the all-tasks estimate equal the observed all-tasks loss
``run["final_losses"][column]`` (only when the estimate and the observation agree on the direction
of the change; rankings are unchanged); ``"loss"`` instead scales every learning rate so that the
simulated all-tasks run reaches ``run["final_loss"]`` (this changes the rankings, and measured worse).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch

from ..config import CALIBRATIONS, SIMULATE_ADAM, SIMULATE_BATCHES
from ..features import HarvestedFeatures
from .batches import BatchPlan, batch_plan, effective_batch, epoch_steps
from .checks import check_source_subsets, check_target
from .epochs import EpochDraws, epoch_draws
from .estimate import GradExResult, _Target
from .losses import MODE_TO_LOSS, default_loss
from .newton import LinearizedSource, subset_sample_weights

__all__ = ["ADAM_AS", "CALIBRATIONS", "simulate", "subset_steps", "subset_weights", "optimizer_spec"]

ADAM_AS = SIMULATE_ADAM
_ADAM_TYPES = ("adam", "adamw", "nadam", "radam", "adamax")


def optimizer_spec(run: Mapping) -> dict:
    """The optimizer of a run record, normalized: ``kind`` ('sgd' | 'adam'), ``decoupled`` (AdamW),
    ``lr``, ``momentum``, ``nesterov``, ``dampening``, ``betas``, ``eps``, ``weight_decay``."""
    opt = dict(run.get("optimizer") or {})
    name = str(opt.get("type", "sgd")).lower()
    kind = "adam" if name in _ADAM_TYPES else "sgd"
    betas = opt.get("betas") or (0.9, 0.999)
    return {
        "kind": kind,
        "decoupled": name == "adamw" or bool(opt.get("decoupled_weight_decay", False)),
        "lr": float(opt.get("lr", 1e-3)),
        "momentum": float(opt.get("momentum", 0.0) or 0.0),
        "nesterov": bool(opt.get("nesterov", False)),
        "dampening": float(opt.get("dampening", 0.0) or 0.0),
        "betas": (float(betas[0]), float(betas[1])),
        "eps": float(opt.get("eps", 1e-8)),
        "weight_decay": float(opt.get("weight_decay", 0.0) or 0.0),
    }


def subset_steps(run: Mapping, n_samples: np.ndarray, draws: Optional[EpochDraws] = None,
                 subsets: Optional[np.ndarray] = None) -> np.ndarray:
    """Optimizer steps of each subset: the recorded steps (step-based run), or, for an epoch-based
    run with per-epoch ``draws`` (:func:`.epochs.epoch_draws`) of the ``subsets`` ``(m, K)``,
    ``sum_e ceil(steps_e x drawn_s,e / drawn_e)``; without them ``epochs x ceil(n_s / (batch_size
    x accumulate_grad_batches x world_size))`` for ``n_s`` samples."""
    n_samples = np.asarray(n_samples, dtype=np.int64)
    steps = int(run.get("steps") or 0)
    if not run.get("epoch_based"):
        if steps < 1:
            raise ValueError("the run record has no optimizer steps ('steps'); nothing to simulate")
        return np.full(len(n_samples), steps, dtype=np.int64)
    if draws is not None and subsets is not None:  # integer ceil: the all-tasks subset gets the run's steps
        total = np.maximum(draws.total, 1)
        per = -(-(draws.steps[None, :] * draws.subset_draws(subsets)) // total[None, :])
        return np.maximum(1, per.sum(1)).astype(np.int64)
    epochs = int(run.get("epochs") or 0)
    per = int(run.get("batch_size") or 0) * int(run.get("accumulate_grad_batches") or 1) * int(run.get("world_size") or 1)
    if epochs < 1 or per < 1:
        raise ValueError("an epoch-based run record needs 'epochs' and 'batch_size'")
    return np.maximum(1, epochs * np.ceil(n_samples / per)).astype(np.int64)


def subset_weights(S: np.ndarray, counts: np.ndarray, weighting: str, draws: Optional[EpochDraws]) -> np.ndarray:
    """``(m, K)`` weight of one sample of each task in each subset's loss (:func:`subset_sample_weights`),
    times how often the run drew that task's samples where it drew only part of the data (each row
    again sums to 1 over the samples; a subset of tasks never drawn gets no weight)."""
    A = subset_sample_weights(S, counts, weighting)
    rates = draws.sample_rates(counts) if draws is not None else None
    if rates is None:
        return A
    A = A * rates[None, :]
    norm = A @ np.asarray(counts, dtype=np.float64)
    return np.divide(A, norm[:, None], out=np.zeros_like(A), where=norm[:, None] > 0)


def _lr_table(run: Mapping, spec: dict, steps: np.ndarray) -> np.ndarray:
    """``(T_max, m)`` learning rate of each subset's step t (0 after its last step)."""
    T = int(steps.max())
    table = np.zeros((T, len(steps)))
    schedule = run.get("lr_schedule")
    sched = np.asarray(schedule, dtype=np.float64) if schedule else None
    for j, Tj in enumerate(steps):
        if sched is None or len(sched) == 0:
            table[:Tj, j] = spec["lr"]
        else:  # stretch the recorded per-step schedule over this subset's steps
            pos = np.minimum((np.arange(Tj) * len(sched)) // Tj, len(sched) - 1)
            table[:Tj, j] = sched[pos]
    return table


# The dual (Gram-matrix) trajectory is used up to this many output rows (n x C): its Gram matrix is
# rows^2 entries (64 Mi in float32 at the limit).
_DUAL_MAX_ROWS = 8192


class _Source(LinearizedSource):
    def __init__(self, feats: HarvestedFeatures, loss: str, device, dtype):
        super().__init__(feats, loss, device, dtype, len(feats.task_names))
        self.task_ids = np.asarray(feats.task_ids).astype(np.int64)

    def full_gradient(self, W: torch.Tensor, readout: torch.Tensor | None, gram: torch.Tensor | None = None):
        """``gradient(Z, t) -> (g, q)`` of the first ``a = Z.shape[1]`` subsets' weighted mean loss over
        every sample (weights W: ``(n, m)``): ``g`` in z ``(k, a)`` (with ``gram``, in the dual
        coordinates ``(nC, a)``), ``q`` the readout's first-order target change ``(T, a)`` (or None)."""
        def grad(Z, t):
            a = Z.shape[1]
            P = self.f0 + ((self.Jf if gram is None else gram) @ Z).view(self.n, self.C, -1)
            gw = self.loss.grad_and_curv(P, self.y)[0] * W[:, None, :a]
            out = gw.reshape(self.n * self.C, -1)
            q = None if readout is None else torch.einsum("nct,ncm->tm", readout, gw)
            return (out if gram is not None else self.Jf.T @ out), q
        return grad


def _where(active, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The optimizer state of the subsets with a step (lr > 0) updated, the others' kept."""
    return new if active is True else torch.where(active, new, old)


def _put(X: torch.Tensor, a: int, value: torch.Tensor) -> torch.Tensor:
    """X with its first ``a`` columns set to ``value`` (the value itself when that is all of X)."""
    if a == X.shape[1]:
        return value
    X[:, :a] = value
    return X


def _run(src: _Source, lrs: torch.Tensor, steps: np.ndarray, spec: dict, adam_as: str,
         W: torch.Tensor | None = None, readout: torch.Tensor | None = None, plan: BatchPlan | None = None):
    """The optimizer's trajectory on z for every subset (columns, ``steps`` of them each, in
    decreasing order: a subset that is done stops costing); returns the final ``(k, m)`` and, with
    ``readout`` (``(n, C, T)``), the exact first-order target change ``(T, m)`` along it. The
    gradients are full-batch (weights ``W``, ``(n, m)``) or the minibatches of ``plan``.

    The readout follows the optimizer's linear filter on the gradients, so it exists only for SGD
    (momentum, Nesterov, weight decay on the weight change) and Adam as ``"preconditioned"``."""
    m = lrs.shape[1]
    nC = src.n * src.C
    # With a linear filter on the gradients (SGD, Adam as preconditioned first-moment descent) Z stays
    # in the span of the features, Z = Jf^T A: running A (nC x m) against the Gram matrix Jf Jf^T
    # is the same trajectory at nC^2 instead of 2 nC k multiply-adds per step and subset.
    dual = (plan is None and (spec["kind"] == "sgd" or adam_as == "preconditioned") and nC < 2 * src.k
            and nC <= _DUAL_MAX_ROWS)
    if plan is not None:
        gradient = plan.gradient(src, readout)
    else:
        gradient = src.full_gradient(W, readout, src.Jf @ src.Jf.T if dual else None)
    Z = torch.zeros(nC if dual else src.k, m, dtype=lrs.dtype, device=lrs.device)
    buf = torch.zeros_like(Z)
    sq = torch.zeros_like(Z)
    wd = spec["weight_decay"]
    b1, b2 = spec["betas"]
    T = 0 if readout is None else readout.shape[2]
    R = torch.zeros(T, m, dtype=lrs.dtype, device=lrs.device)  # gbar_j . dW, per column and subset
    rbuf = torch.zeros_like(R)
    steps = np.asarray(steps)
    if plan is not None:  # minibatches: a step's gradient is summed over the windows of its batch
        G, GR = torch.zeros_like(Z), torch.zeros_like(R)
        count = torch.zeros(m, dtype=torch.long, device=lrs.device)  # steps taken, per subset
    for t in range(lrs.shape[0] if plan is None else len(plan.windows)):
        a = int(np.sum(steps > t)) if plan is None else int(plan.running[t])  # still running: a prefix
        if a == 0:
            break
        z, zb, rr, rb = Z[:, :a], buf[:, :a], R[:, :a], rbuf[:, :a]
        g, q = gradient(z, t)  # q: gbar_j . D (sum_i J_i^T g_i w_i)
        if plan is None:
            lr, c1, c2 = lrs[t, :a][None, :], 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            damp = (1 - spec["dampening"]) if t else 1.0
        else:
            g, q = G[:, :a] + g, (GR[:, :a] + q if T else None)
            stepping = plan.stepping[t, :a]
            keep = (~stepping).to(g.dtype)  # those whose batch ends here begin a new one
            G, GR = _put(G, a, g * keep), (_put(GR, a, q * keep) if T else GR)
            if not bool(stepping.any()):
                continue
            cnt = count[:a]
            lr = lrs.gather(0, cnt.clamp(max=lrs.shape[0] - 1)[None, :]) * stepping
            c1, c2 = 1 - b1 ** (cnt + 1).to(lr.dtype), 1 - b2 ** (cnt + 1).to(lr.dtype)
            damp = torch.where(cnt > 0, 1 - spec["dampening"], 1.0).to(lr.dtype)
            count[:a] += stepping
        active = lr > 0
        if bool(active.all()):  # the usual case: no mask to apply
            active = True
        q = rr if q is None else q
        if spec["kind"] == "sgd":
            if wd:
                g = g + wd * z
                q = q + wd * rr if T else q
            if spec["momentum"]:
                zb = _where(active, zb * spec["momentum"] + damp * g, zb)
                step = g + spec["momentum"] * zb if spec["nesterov"] else zb
                if T:
                    rb = _where(active, rb * spec["momentum"] + damp * q, rb)
                    rstep = q + spec["momentum"] * rb if spec["nesterov"] else rb
            else:
                step, rstep = g, q
            Z, buf = _put(Z, a, z - lr * step), _put(buf, a, zb)
            if T:
                R, rbuf = _put(R, a, rr - lr * rstep), _put(rbuf, a, rb)
            continue
        if wd and not spec["decoupled"]:
            g = g + wd * z
            q = q + wd * rr if T else q
        if wd and spec["decoupled"]:
            z = z * (1 - lr * wd)
            rr = rr * (1 - lr * wd)
        zb = _where(active, b1 * zb + (1 - b1) * g, zb)
        buf = _put(buf, a, zb)
        if adam_as == "preconditioned":
            Z = _put(Z, a, z - (lr / c1) * zb)
            if T:
                rb = _where(active, b1 * rb + (1 - b1) * q, rb)
                R, rbuf = _put(R, a, rr - (lr / c1) * rb), _put(rbuf, a, rb)
            continue
        zs = _where(active, b2 * sq[:, :a] + (1 - b2) * g * g, sq[:, :a])
        sq = _put(sq, a, zs)
        Z = _put(Z, a, z - lr * (zb / c1) / (torch.sqrt(zs / c2) + spec["eps"]))
    return (src.Jf.T @ Z if dual else Z), R


def simulate(
    source: HarvestedFeatures,
    target: HarvestedFeatures,
    subsets,
    run: Mapping,
    *,
    loss: Optional[str] = None,
    weighting: str = "sample",
    adam_as: str = "auto",
    calibrate: str = "none",
    lr_scale: float = 1.0,
    use_readout: bool = True,
    batches: str = "full",
    batch_orders: int = 1,
    batch_seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    dtype=torch.float32,
) -> GradExResult:
    """Estimate F^(s) by running the recorded optimizer on the linearized model for each subset.

    ``run``: the record of the watched run (:mod:`lightning_ksm.callbacks.run_record` writes it):
    ``optimizer`` (``type``, ``lr``, ``betas``, ``eps``, ``momentum``, ``nesterov``,
    ``weight_decay``), ``lr_schedule`` (per-step learning rates, optional), ``steps``,
    ``epoch_based``, ``epochs``, ``per_epoch`` (the steps and task samples drawn per epoch,
    :mod:`.epochs`; else ``batch_size``, ``accumulate_grad_batches``, ``world_size``) and, for
    ``calibrate="loss"``, ``final_loss`` (the observed all-tasks target loss). ``weighting``:
    "sample" (default: a run that draws batches from the union of the tasks' data) or "task".
    ``lr_scale`` multiplies every learning rate (after calibration). ``calibrate="effect"`` needs
    ``final_losses`` (the observed target loss of each column) or ``final_loss`` ("all").
    ``use_readout``: use the source features' exact target readout where it applies. ``dtype``:
    of the simulated trajectory (float32: 3-4x faster than float64, and the same F^ to a relative
    1.1e-6 on the fidelity harness, ``benchmarks/results/simulate_precision.json``); the target
    losses are evaluated in float64 either way. Returns a
    :class:`~lightning_ksm.estimation.estimate.GradExResult` (``lam`` is 0, ``n_iter`` the steps).
    """
    if adam_as not in ADAM_AS:
        raise ValueError(f"adam_as must be one of {ADAM_AS}, got {adam_as!r}")
    if calibrate not in CALIBRATIONS:
        raise ValueError(f"calibrate must be one of {CALIBRATIONS}, got {calibrate!r}")
    if batches not in SIMULATE_BATCHES:
        raise ValueError(f"batches (simulate_batches) must be one of {SIMULATE_BATCHES}, got {batches!r}")
    if not (isinstance(batch_orders, int) and batch_orders >= 1):
        raise ValueError(f"batch_orders must be an integer >= 1, got {batch_orders!r}")
    if not isinstance(run, Mapping):
        raise TypeError(f"run must be a run record (a dict), got {type(run).__name__}")
    if adam_as == "auto":
        adam_as = "preconditioned" if source.preconditioned else "adam"
    loss = loss or default_loss(source.mode)
    check_target(source, target, loss, None)
    S, names = check_source_subsets(source, subsets, loss)
    spec = optimizer_spec(run)
    src = _Source(source, loss, device, dtype)
    tgt = _Target(target, loss, src.C, device, torch.float64)
    read = _readout_columns(source, tgt, loss, spec, adam_as) if use_readout else {}
    readout = None
    if read:
        readout = torch.as_tensor(np.asarray(source.readout)[:, :, list(read.values())], device=device, dtype=dtype)
    S_all = np.vstack([S, np.ones((1, S.shape[1]), dtype=bool)])  # + the all-tasks run (calibration)
    n_s = S_all.astype(np.int64) @ src.counts
    draws = epoch_draws(run, source.task_names, src.counts)  # what the run drew per epoch, if recorded
    steps = subset_steps(run, n_s, draws, S_all)
    A = subset_weights(S_all, src.counts, weighting, draws)  # (m + 1, K)
    per_step = effective_batch(run, draws) if batches != "full" else None
    per_epoch = None if per_step is None else epoch_steps(run, n_s, draws, S_all, per_step)
    n_orders = batch_orders if batches == "run" and per_step is not None else 1  # "reduced": one order
    tid = torch.as_tensor(src.task_ids, device=device)
    cols = [tgt.names.index(c) for c in read]
    linear_parts = []  # (exact, projected) first-order changes of the all-tasks row

    def trajectory(rows: np.ndarray, scale: float, order: int, with_readout: bool):
        """Final Z and readout of the subsets ``rows`` (in decreasing order of steps)."""
        lrs = torch.as_tensor(scale * _lr_table(run, spec, steps[rows]), device=device, dtype=dtype)
        rd = readout if with_readout else None
        if per_step is None:
            W = torch.as_tensor(A[rows], device=device, dtype=dtype)[:, tid].T  # (n, m_b)
            return _run(src, lrs, steps[rows], spec, adam_as, W=W, readout=rd)
        plan = batch_plan(A[rows], src.task_ids, steps[rows], per_epoch[rows], per_step, batch_seed + order,
                          device, dtype)
        plan.reduced = batches == "reduced"
        Z, R = _run(src, lrs[:, plan.perm], steps[rows][plan.perm], spec, adam_as, readout=rd, plan=plan)
        back = np.argsort(plan.perm)  # the columns in the order of rows again
        return Z[:, back], R[:, back]

    def losses_for(rows: np.ndarray, scale: float):
        lo, acc = 0.0, 0.0
        for order in range(n_orders):  # the mean over batch orders
            Z, R = trajectory(rows, scale, order, True)
            Z = Z.to(torch.float64)
            lo_r, acc_r, _ = tgt.evaluate(Z, True, None)
            if cols:  # the first-order part read exactly instead of through the projection
                lin = tgt.linear_part(Z)[cols]
                lo_r[:, cols] += (R.to(torch.float64) - lin).T.cpu().numpy()
                if len(S_all) - 1 in rows:
                    at = int(np.nonzero(rows == len(S_all) - 1)[0][0])
                    linear_parts.append((R[:, at].to(torch.float64).cpu().numpy(), lin[:, at].cpu().numpy()))
            lo = lo + lo_r
            acc = None if acc_r is None else acc + acc_r
        return lo / n_orders, (None if acc is None else acc / n_orders)

    def all_tasks_loss(c: float) -> float:
        Z = trajectory(np.array([len(S_all) - 1]), c, 0, False)[0].to(torch.float64)
        return float(tgt.evaluate(Z, False, None)[0][0, -1])

    scale = float(lr_scale)
    if calibrate == "loss":
        scale *= _calibrated_scale(run, all_tasks_loss)
    losses, acc = np.zeros((len(S_all), len(tgt.names))), None
    # the minibatch path holds no (n, m) products: larger batches of subsets, larger matrix products
    for rows in _row_batches(steps, batch_size if per_step is None else 4 * batch_size):
        lo, ac = losses_for(rows, scale)
        losses[rows] = lo
        if ac is not None:
            acc = np.zeros_like(losses) if acc is None else acc
            acc[rows] = ac
    acc = None if acc is None else acc[:-1]
    effect, changes = None, None
    if calibrate == "effect":
        losses, effect, changes = _effect_calibrated(losses, tgt, run)
    m = len(S)
    return GradExResult(
        losses=losses[:-1], target_names=tgt.names, subsets=S.copy(),
        converged=np.ones(m, dtype=bool), n_iter=steps[:-1], grad_norms=np.zeros(m), solution_norms=np.zeros(m),
        loss=loss, weighting=weighting, lam=0.0, accuracy=acc,
        extras={"estimator": "simulate", "optimizer": spec, "adam_as": adam_as, "calibrate": calibrate,
                "lr_scale": scale, "steps": {"min": int(steps[:-1].min()), "max": int(steps[:-1].max()),
                                            "all_tasks": int(steps[-1])},
                "exact_readout": list(read), "effect_scale": effect, "all_tasks_change": changes,
                "readout_vs_projected": ({c: float(linear_parts[-1][0][i] / linear_parts[-1][1][i])
                                          for i, c in enumerate(read)} if linear_parts else {}),
                "batches": ({"kind": batches, "per_step": per_step, "orders": n_orders, "seed": batch_seed}
                            if per_step is not None else "full"),
                "all_tasks_estimate": dict(zip(tgt.names, losses[-1].tolist()))},
    )


def _row_batches(steps: np.ndarray, size: int) -> list:
    """The subsets in batches of at most ``size``, in decreasing order of steps: a batch shares its
    length, and in a batch a subset that is done stops costing."""
    order = np.argsort(-steps, kind="stable")
    return [order[b0:b0 + size] for b0 in range(0, len(order), size)]


def _readout_columns(source: HarvestedFeatures, tgt: _Target, loss: str, spec: dict, adam_as: str) -> dict:
    """``{column: position in source.readout}`` of the target columns read out exactly: the readout
    was computed with the mode's own loss, and the simulated optimizer is linear in the gradients."""
    if source.readout is None or MODE_TO_LOSS.get(source.mode) != loss:
        return {}
    if spec["kind"] != "sgd" and adam_as != "preconditioned":
        return {}
    if spec["kind"] != "sgd" and not source.preconditioned:
        return {}
    return {c: i for i, c in enumerate(source.readout_columns) if c in tgt.names}


def _effect_calibrated(losses: np.ndarray, tgt: _Target, run: Mapping):
    """Scale each column's change from W0 so that the all-tasks row (last) equals the observed loss.

    Returns the losses, ``{column: factor}`` (None where it was not applied: no observation, or
    estimate and observation disagree on the direction of the change) and ``{column: {"w0": loss,
    "estimated": change, "observed": change}}`` for the columns with an observation (the regime check of
    :func:`.checks.linear_regime_notes`)."""
    observed = dict(run.get("final_losses") or {})
    if "all" not in observed and run.get("final_loss") is not None:
        observed["all"] = run["final_loss"]
    base = tgt.evaluate(torch.zeros(tgt.Jf.shape[1], 1, dtype=tgt.Jf.dtype, device=tgt.Jf.device), False, None)[0][0]
    out, factors, changes = losses.copy(), {}, {}
    for j, name in enumerate(tgt.names):
        obs = observed.get(name)
        est = losses[-1, j] - base[j]
        factor = None
        if obs is not None and math.isfinite(float(obs)):
            changes[name] = {"w0": float(base[j]), "estimated": float(est), "observed": float(obs) - float(base[j])}
            if est != 0:
                f = (float(obs) - base[j]) / est
                factor = float(f) if math.isfinite(f) and f > 0 else None
        if factor is not None:
            out[:, j] = base[j] + factor * (losses[:, j] - base[j])
        factors[name] = factor
    return out, factors, changes


def _calibrated_scale(run: Mapping, all_loss) -> float:
    """The learning-rate factor c (0.01 .. 100, bisection in log c) with which the simulated
    all-tasks run reaches the observed all-tasks loss ``run["final_loss"]``."""
    observed = run.get("final_loss")
    if observed is None or not math.isfinite(float(observed)):
        raise ValueError('calibrate="loss" needs the observed all-tasks target loss run["final_loss"]')
    observed = float(observed)
    lo, hi = math.log(0.01), math.log(100.0)
    f_lo, f_hi = all_loss(math.exp(lo)), all_loss(math.exp(hi))
    if not (min(f_lo, f_hi) <= observed <= max(f_lo, f_hi)):
        return math.exp(lo) if abs(f_lo - observed) < abs(f_hi - observed) else math.exp(hi)
    decreasing = f_hi < f_lo
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        f_mid = all_loss(math.exp(mid))
        if (f_mid > observed) == decreasing:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))
