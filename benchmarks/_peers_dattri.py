"""Per-sample peers through dattri's public APIs, and the one task-level aggregation they all share.

Every per-sample method returns a (n_train_samples, n_target_samples) matrix ``A`` in one sign
convention: ``A[i, j] > 0`` means training sample i *lowers* target sample j's loss (it helps),
which is dattri's convention for its inner-product attributors (gradients of the loss on both
sides: ``g_i^T H^-1 g_j``, ``g_i . g_j``) and for TRAK (gradients of the margin on both sides).

**Aggregation** (identical for every method): the target is the mean loss over the target samples,
so a task's score is ``sum over the task's samples i of mean_j A[i, j]`` (``"sum"``, reported as the
method's row) and ``mean over the task's samples`` (``"mean"``, the ``*_mean`` rows). When only
``n_per_task`` samples of a task are attributed, the sum is scaled by ``n_task / n_sampled`` (an
unbiased estimate of the full sum). A score is "the predicted increase of the target loss when the
task is removed": > 0 helps, the project's convention (docs/concepts.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["sample_positions", "aggregate", "PER_SAMPLE", "run_per_sample"]


def sample_positions(task: torch.Tensor, K: int, n_per_task, seed: int = 0):
    """Positions of the attributed training samples (all, or ``n_per_task`` per task, seeded) and
    each task's scale ``n_task / n_sampled``."""
    task = np.asarray(task)
    if n_per_task is None:
        return np.arange(len(task)), np.ones(K)
    rng = np.random.default_rng(seed)
    pos, scale = [], np.ones(K)
    for k in range(K):
        idx = np.flatnonzero(task == k)
        take = np.sort(rng.choice(idx, size=min(n_per_task, len(idx)), replace=False))
        pos.append(take)
        scale[k] = len(idx) / len(take)
    return np.concatenate(pos), scale


def aggregate(A: np.ndarray, task_of_rows: np.ndarray, K: int, scale: np.ndarray) -> dict:
    """Task scores from a per-sample matrix: ``{"sum": (K,), "mean": (K,)}`` (see the module doc)."""
    per_sample = np.asarray(A, dtype=np.float64).mean(1)
    out = {"sum": np.zeros(K), "mean": np.zeros(K)}
    for k in range(K):
        v = per_sample[task_of_rows == k]
        out["sum"][k] = v.sum() * scale[k]
        out["mean"][k] = v.mean()
    return out


# -- the model functions dattri differentiates -----------------------------------------------------
def _fns(model: nn.Module, kind: str):
    """(loss, margin, correct-probability) in torch.func style; each takes one sample (no batch
    dimension, as TRAK/TracIn's vmap passes it) or a batch (the Hessian passes of the IF solvers)."""

    def split(data):
        x, y = data
        if kind == "ce":
            y = y.long()
        single = y.dim() == 0
        return (x.unsqueeze(0), y.unsqueeze(0)) if single else (x, y)

    def out(params, x):
        return functional_call(model, params, (x,))

    if kind == "bce":
        def margin_of(params, data):
            x, y = split(data)
            return (2 * y - 1) * out(params, x)[:, 0]
    else:
        def margin_of(params, data):
            x, y = split(data)
            z = out(params, x)
            zy = z.gather(1, y[:, None])[:, 0]
            mask = torch.arange(z.shape[1]) == y[:, None]  # (no one_hot: it reads y's values, vmap cannot)
            others = z.masked_fill(mask, float("-inf"))
            return zy - torch.logsumexp(others, 1)

    def loss(params, data):
        return nn.functional.softplus(-margin_of(params, data)).mean() if kind == "bce" else \
            nn.functional.cross_entropy(out(params, split(data)[0]), split(data)[1])

    def margin(params, data):
        return margin_of(params, data).sum()

    def correct_probability(params, data):
        return torch.sigmoid(margin_of(params, data)).sum() if kind == "bce" else \
            torch.exp(-nn.functional.cross_entropy(out(params, split(data)[0]), split(data)[1]))

    return loss, margin, correct_probability


def _loader(x, y, batch):
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- the methods -----------------------------------------------------------------------------------
def _trak(ctx, proj_dim, regularization=0.0):
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    _, margin, cp = ctx["fns"]
    task = AttributionTask(loss_func=margin, model=ctx["model"], checkpoints=ctx["final"])
    att = TRAKAttributor(task=task, correct_probability_func=cp, device="cpu", regularization=regularization,
                         projector_kwargs={"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0,
                                           "device": "cpu"})
    att.cache(ctx["train"])
    return att.attribute(ctx["test"])  # TRAK attributes the cached training set


def _tracin(ctx, checkpoints, weights, normalized, proj_dim):
    from dattri.algorithm import TracInAttributor
    from dattri.task import AttributionTask

    loss, _, _ = ctx["fns"]
    task = AttributionTask(loss_func=loss, model=ctx["model"], checkpoints=checkpoints)
    kwargs = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"} if proj_dim else None
    att = TracInAttributor(task=task, weight_list=torch.tensor(weights, dtype=torch.float64 if ctx["double"] else
                                                               torch.float32), normalized_grad=normalized,
                           projector_kwargs=kwargs, device="cpu")
    if not proj_dim:
        att.projector_kwargs = None  # exact gradients (dattri projects whenever projector_kwargs is set)
    return att.attribute(ctx["train"], ctx["test"])


def _if(ctx, solver, **kw):
    from dattri import algorithm as alg
    from dattri.task import AttributionTask

    loss, _, _ = ctx["fns"]
    task = AttributionTask(loss_func=loss, model=ctx["model"], checkpoints=ctx["final"])
    cls = {"explicit": alg.IFAttributorExplicit, "cg": alg.IFAttributorCG, "lissa": alg.IFAttributorLiSSA,
           "arnoldi": alg.IFAttributorArnoldi, "datainf": alg.IFAttributorDataInf, "ekfac": alg.IFAttributorEKFAC}
    att = cls[solver](task=task, device="cpu", **kw)
    att.cache(ctx["hessian"])
    return att.attribute(ctx["train"], ctx["test"])


def _sweep(problem_small: bool, n_params: int, linear_names):
    """(row name, function of ctx, hyperparameters): dattri's methods and the sweeps their docs name."""
    rows = []
    for d in ((32, 128, 512) if n_params < 100 else (128, 512, 2048)):
        rows.append((f"trak_p{d}", lambda c, d=d: _trak(c, d, 1e-6 if n_params < 100 else 0.0),
                     {"proj_dim": d, "checkpoints": "final model only (one run)"}))
    proj = None if n_params <= 20_000 else 512
    rows.append(("grad_dot", lambda c: _tracin(c, [c["final"]], [1.0], False, proj),
                 {"proj_dim": proj or "none (exact)"}))
    rows.append(("grad_cos", lambda c: _tracin(c, [c["final"]], [1.0], True, proj),
                 {"proj_dim": proj or "none (exact)"}))
    rows.append(("tracin", lambda c: _tracin(c, c["ckpts"], c["ckpt_lr"], False, proj),
                 {"proj_dim": proj or "none (exact)", "checkpoints": "evenly spaced along the watched run (the last = the "
                  "final model), lr weights"}))
    damp = (1e-3, 1e-2, 1e-1) if problem_small else (1e-2, 1e-1)
    for lam in damp:
        if n_params <= 2_000:
            rows.append((f"if_explicit_d{lam:g}", lambda c, lam=lam: _if(c, "explicit", regularization=lam),
                         {"damping": lam}))
        rows.append((f"if_cg_d{lam:g}", lambda c, lam=lam: _if(c, "cg", regularization=lam, max_iter=10),
                     {"damping": lam, "max_iter": 10}))
        rows.append((f"if_lissa_d{lam:g}", lambda c, lam=lam: _if(c, "lissa", damping=lam, recursion_depth=100,
                                                                 batch_size=32, scaling=50.0),
                     {"damping": lam, "recursion_depth": 100, "scaling": 50}))
        ak, ai = min(50, n_params // 2), min(60, n_params - 1)  # Arnoldi: fewer iterations than parameters
        rows.append((f"if_arnoldi_d{lam:g}", lambda c, lam=lam: _if(c, "arnoldi", regularization=lam, proj_dim=ak,
                                                                   max_iter=ai),
                     {"damping": lam, "proj_dim": ak, "max_iter": ai}))
        rows.append((f"if_datainf_d{lam:g}", lambda c, lam=lam: _if(c, "datainf", regularization=lam),
                     {"damping": lam}))
        if linear_names:
            rows.append((f"if_ekfac_d{lam:g}", lambda c, lam=lam: _if(c, "ekfac", damping=lam,
                                                                     module_name=linear_names),
                         {"damping": lam, "modules": "every nn.Linear"}))
    return rows


PER_SAMPLE = _sweep  # the list of rows is built per problem


def run_per_sample(problem, *, n_per_task=None, n_targets=None, n_hessian=512, seed=0, only=None,
                   checkpoints=None, log=print, cache=None):
    """Every dattri method on ``problem``: ``{name: (A, seconds, peak_bytes, hyper, info)}`` where A's
    rows are the attributed training samples (``info["positions"]``)."""
    import time

    from _peers_classics import PeakRSS

    pos, scale = sample_positions(problem.task, problem.K, n_per_task, seed)
    rng = np.random.default_rng(seed + 1)
    tpos = np.arange(len(problem.y_target)) if n_targets is None or n_targets >= len(problem.y_target) else \
        np.sort(rng.choice(len(problem.y_target), n_targets, replace=False))
    hpos = np.sort(rng.choice(len(problem.y), min(n_hessian, len(problem.y)), replace=False))
    model = problem.model
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    n_params = _n_params(model)
    model.load_state_dict(problem.final)
    model.eval()
    double = next(model.parameters()).dtype == torch.float64
    y_dtype = problem.y.dtype
    ctx = {
        "model": model, "final": problem.final, "fns": _fns(model, problem.loss_kind), "double": double,
        # dattri's inner-product attributors redo the test side (the iHVP solve) for every training
        # batch: one batch per side when the model is small enough
        "train": _loader(problem.x[pos], problem.y[pos].to(y_dtype), len(pos) if n_params < 100_000 else 256),
        "test": _loader(problem.x_target[tpos], problem.y_target[tpos], 64),  # (vmapped iHVP solves: memory)
        "hessian": _loader(problem.x[hpos], problem.y[hpos], len(hpos)),
        "ckpts": [c for c, _ in (checkpoints or [(problem.final, 1.0)])],
        "ckpt_lr": [w for _, w in (checkpoints or [(problem.final, 1.0)])],
    }
    out = {}
    for name, fn, hyper in _sweep(n_params < 10_000, n_params, linear):
        if only is not None and name not in only:
            continue
        if cache is not None and name in cache:
            out[name] = cache[name]
            continue
        with PeakRSS() as mem:
            t = time.perf_counter()
            try:
                A = fn(ctx).detach().double().numpy()
                err = None
            except Exception as e:  # a peer that fails here is a result too: recorded, not hidden
                A, err = None, f"{type(e).__name__}: {e}"[:400]
            sec = time.perf_counter() - t
        peak = mem.extra_bytes
        info = {"n_train_attributed": int(len(pos)), "n_targets": int(len(tpos)), "n_hessian": int(len(hpos)),
                "n_per_task": n_per_task, "error": err}
        scores = aggregate(A, np.asarray(problem.task)[pos], problem.K, scale) if A is not None and \
            np.all(np.isfinite(A)) else None
        if A is not None and scores is None:
            info["error"] = "non-finite attributions"
        out[name] = {"scores": None if scores is None else {k: v.tolist() for k, v in scores.items()},
                     "seconds": sec, "peak_rss_extra_bytes": peak, "hyper": hyper, "info": info}
        log(f"  {name}: {sec:.1f}s" + (f" ({info['error']})" if info["error"] else ""))
        if cache is not None:
            cache[name] = out[name]
    return out
