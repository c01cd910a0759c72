"""Task-level classics and the project's own estimator for benchmarks/peers.py.

- ``watched_run``: the watched all-tasks run replayed step by step (``Problem.train_loop``) with two
  measurements: **TAG's lookahead affinity** (Fifty et al. 2021) of every task onto the target: at
  each step, the optimizer's update computed from the task's samples of the batch alone (Adam's
  moments and step count as they are at that step), and ``1 - L_target(lookahead) / L_target(now)``,
  averaged over the steps where the task has samples; and the **TracIn checkpoints** (5 evenly
  spaced, with the learning rate as weight). The replay is checked against the recorded final model.
- ``grad_cos_affinity``: the cosine between a task's mean training-loss gradient and the target-loss
  gradient, at W0 (the start of the watched run) and at the final model.
- ``linear_datamodel`` / ``kernel_datamodel``: surrogates fitted on the tuning half's *real*
  retrainings (their cost: those retrainings).
- ``loo_retraining``: the leave-one-out retrainings themselves (one batch seed; the truth it is
  compared to is the other seeds' mean).
- ``kernelsm``: the user-facing estimator: ``lightning_ksm.analyze`` on the harvested features with
  the default ``AnalysisConfig`` (GradEx on 200 random subsets, the kernel surrogate, every readout),
  its surrogate predicting the evaluation subsets; ``gradex_default``: GradEx's F^ on the evaluation
  subsets directly.
"""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

__all__ = ["watched_run", "grad_cos_affinity", "kernelsm", "gradex_default", "PeakRSS"]


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms (torch's CPU tensors are
    not seen by tracemalloc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.extra_bytes = self.peak - self.base
        return False


def _loss(model, params, x, y, kind):
    z = functional_call(model, params, (x,))
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float())
    return nn.functional.cross_entropy(z, y)


def watched_run(problem, *, n_checkpoints: int = 5, tag_every: int = 1, n_target: int | None = None):
    """Replays the watched run: TAG scores (K,), TracIn checkpoints [(state, lr)], replay check."""
    K = problem.K
    tpos = slice(None) if n_target is None else np.random.default_rng(3).choice(
        len(problem.y_target), min(n_target, len(problem.y_target)), replace=False)
    xt, yt = problem.x_target[tpos], problem.y_target[tpos]
    task = torch.as_tensor(problem.task)
    tag_sum, tag_n = np.zeros(K), np.zeros(K)
    ckpt_states = []
    seconds = {"tag": 0.0}
    total_steps = problem.run["steps"] if problem.run else None

    def hook(model, opt, idx, step):
        if total_steps and step % max(1, total_steps // n_checkpoints) == 0 and len(ckpt_states) < n_checkpoints:
            ckpt_states.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                                float(opt.param_groups[0]["lr"])))
        if step % tag_every:
            return
        t0 = time.perf_counter()
        names = [n for n, _ in model.named_parameters()]
        params = dict(model.named_parameters())
        group = opt.param_groups[0]
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
        with torch.no_grad():
            base = float(_loss(model, {n: p.detach() for n, p in params.items()}, xt, yt, problem.loss_kind))
        tids = task[idx]
        for k in range(K):
            sel = idx[tids == k]
            if len(sel) == 0:
                continue
            g = torch.autograd.grad(_loss(model, params, problem.x[sel], problem.y[sel], problem.loss_kind),
                                    [params[n] for n in names])
            new = {}
            with torch.no_grad():
                for n, gi in zip(names, g):
                    p = params[n]
                    st = opt.state.get(p, {})
                    t = int(st["step"]) + 1 if "step" in st else 1
                    m = st["exp_avg"] * b1 + (1 - b1) * gi if "exp_avg" in st else (1 - b1) * gi
                    v = st["exp_avg_sq"] * b2 + (1 - b2) * gi * gi if "exp_avg_sq" in st else (1 - b2) * gi * gi
                    upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                    new[n] = p * (1 - lr * wd) - lr * upd
                after = float(_loss(model, new, xt, yt, problem.loss_kind))
            tag_sum[k] += 1 - after / base
            tag_n[k] += 1
        seconds["tag"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    model, opt, steps = problem.train_loop(hook)
    seconds["replay_total"] = time.perf_counter() - t0
    final = model.state_dict()
    diff = max(float((final[k].float() - problem.final[k].float()).abs().max()) for k in final)
    ckpt_states.append(({k: v.detach().clone() for k, v in final.items()}, ckpt_states[-1][1] if ckpt_states else 1.0))
    return {"tag": (tag_sum / np.maximum(tag_n, 1)).tolist(), "tag_seconds": seconds["tag"],
            "replay_seconds": seconds["replay_total"], "replay_max_abs_diff_vs_recorded_final": diff,
            "steps": steps, "tag_every": tag_every, "n_target": int(len(yt))}, ckpt_states[-n_checkpoints:]


def _flat_grad(model, state, x, y, kind):
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    g = torch.autograd.grad(_loss(model, params, x, y, kind), list(params.values()))
    return torch.cat([gi.flatten() for gi in g]).double()


def grad_cos_affinity(problem, state, chunk: int = 2048) -> np.ndarray:
    """cos(mean training-loss gradient of task k, target-loss gradient) at ``state``."""
    model = copy.deepcopy(problem.model)
    gt = _flat_grad(model, state, problem.x_target, problem.y_target, problem.loss_kind)
    task = torch.as_tensor(problem.task)
    out = np.zeros(problem.K)
    for k in range(problem.K):
        sel = torch.nonzero(task == k).flatten()
        g = sum(_flat_grad(model, state, problem.x[sel[b:b + chunk]], problem.y[sel[b:b + chunk]], problem.loss_kind)
                * len(sel[b:b + chunk]) for b in range(0, len(sel), chunk)) / len(sel)
        out[k] = float(g @ gt / (g.norm() * gt.norm()))
    return out


def _columns(features, task_names):
    """Column j of the features' task order is problem task ``task_names.index(...)``."""
    return np.array([task_names.index(str(n)) for n in features.task_names])


def kernelsm(problem, S_pred: np.ndarray) -> tuple:
    """lightning_ksm.analyze with the default settings; its surrogate's F^ on ``S_pred``."""
    from lightning_ksm import analyze
    from lightning_ksm.config import AnalysisConfig

    src, tgt = problem.features
    cols = _columns(src, problem.task_names)
    report = analyze(src, tgt, AnalysisConfig(), extra_config={"run": problem.run} if problem.run else None)
    pred = np.asarray(report.surrogate_.predict(S_pred[:, cols])).reshape(len(S_pred), -1)
    names = [str(n) for n in report.target_names]
    return pred[:, names.index("all") if "all" in names else 0], report


def gradex_default(problem, S_pred: np.ndarray) -> np.ndarray:
    """GradEx's own F^ (the default estimator, as the fidelity harness's ``default`` row)."""
    from lightning_ksm.config import AnalysisConfig
    from lightning_ksm.estimation import estimate_subsets

    src, tgt = problem.features
    cols = _columns(src, problem.task_names)
    res = estimate_subsets(src, tgt, S_pred[:, cols], AnalysisConfig(), run=problem.run)
    return np.asarray(res.column("all") if "all" in res.target_names else res.losses[:, 0])
