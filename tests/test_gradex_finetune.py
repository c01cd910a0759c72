"""Acceptance: GradEx's F^(s) tracks the target loss of REALLY fine-tuning on task subsets.

A small MLP is pretrained on a related task, then fine-tuned (full batch, Adam, the task-weighted
loss of eq. 1 plus the proximal term lam/2 |W - W0|^2) on 16 subsets of K = 8 tasks. Each task
lives in its own region of the plane with its own decision boundary and label-noise level, so
the target loss really depends on which tasks are selected. GradEx, from features harvested
once at W0, must rank the subsets like the real fine-tuning does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.func import functional_call

from lightning_ksm.estimation import gradex
from lightning_ksm.harvesting import harvest, projector_for_model
from lightning_ksm.retrain import proximal_finetune

K = 8
N_PER_TASK = 60
LAM = 0.03
STEPS = 300
LR = 0.01


def _task_data(angle, tilt, noise, n, gen):
    """Points around angle on a circle of radius 1.5, labelled by a line through the centre."""
    center = 1.5 * torch.tensor([math.cos(angle), math.sin(angle)])
    x = center + torch.randn(n, 2, generator=gen)
    normal = torch.tensor([math.cos(angle + tilt), math.sin(angle + tilt)])
    y = ((x - center) @ normal > 0).long()
    flip = torch.rand(n, generator=gen) < noise
    return x, torch.where(flip, 1 - y, y)


def _problem():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    angles = [2 * math.pi * t / K for t in range(K)]
    tilts = [0.6 if t % 2 else -0.6 for t in range(K)]
    noises = [0.05 * (t % 4) for t in range(K)]
    xs, ys, ts = [], [], []
    for t in range(K):
        x, y = _task_data(angles[t], tilts[t], noises[t], N_PER_TASK, gen)
        xs.append(x), ys.append(y), ts.append(torch.full((N_PER_TASK,), t))
    source = (torch.cat(xs), torch.cat(ys), torch.cat(ts))
    # target: a region between tasks 1 and 2, with task 1's boundary tilt
    target = _task_data(2 * math.pi * 1.5 / K, 0.6, 0.0, 200, gen)
    # related pretraining task: the same regions, but odd tasks' labels flipped
    pre_x, pre_y = [], []
    for t in range(K):
        x, y = _task_data(angles[t], tilts[t], 0.0, 100, gen)
        pre_x.append(x), pre_y.append(y if t % 2 == 0 else 1 - y)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    px, py = torch.cat(pre_x), torch.cat(pre_y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(px), py).backward()
        opt.step()
    return model, source, target


def _finetune_target_loss(model, W0, source, target, subset):
    """Really fine-tune from W0 on the subset (task-weighted eq. 1 + proximal term)."""
    X, Y, T = source
    params = proximal_finetune(model, W0, X, Y, T, subset, n_tasks=K, lam=LAM, steps=STEPS, lr=LR)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(functional_call(model, params, (target[0],)), target[1]).item()


@pytest.fixture(scope="module")
def finetuned():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save
    try:
        model, source, target = _problem()
        W0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        rng = np.random.default_rng(0)
        S = rng.random((16, K)) < 0.5
        S[~S.any(axis=1), 0] = True
        F = np.array([_finetune_target_loss(model, W0, source, target, s) for s in S])
        yield model, source, target, S, F
    finally:
        torch.set_num_threads(threads)


def _harvest(model, source, target, kind, k, mode):
    projector = projector_for_model(model, projection=kind, k=k, seed=0)
    X, Y, T = source
    src = harvest(model, [(X, Y, T)], projector=projector, mode=mode, task_names=list(range(K)))
    tgt = harvest(model, [(target[0], target[1], torch.zeros(len(target[1]), dtype=torch.long))],
                  projector=projector, mode=mode)
    return src, tgt


@pytest.mark.parametrize(
    "kind,k,mode",
    [("identity", None, "logits"), ("gaussian", 256, "margin")],
    ids=["exact-jacobians-logits", "projected-k256-margin"],
)
def test_gradex_tracks_real_finetuning(finetuned, kind, k, mode):
    model, source, target, S, F = finetuned
    # the subsets must really matter, else a rank correlation means nothing
    assert F.max() > 1.5 * F.min()
    src, tgt = _harvest(model, source, target, kind, k, mode)
    res = gradex(src, tgt, S, lam=LAM)
    assert res.converged.all()
    F_hat = res.column("all")
    rho = spearmanr(F, F_hat)[0]
    assert rho >= 0.8, (rho, np.c_[F, F_hat])
    assert np.median(np.abs(F_hat - F) / F) < 0.25
