"""Shared test problems with known answers: planted functions of the task subset (ground truth
for the surrogates and readouts) and harvested-feature factories (ground truth for GradEx and the
analysis). Tests import them with ``from conftest import ...``.

The tiny Lightning problem stays in ``lit_problem.py``: ``strategy="ddp_spawn"`` pickles its
classes by module, and the planted classification problem with real retraining is
``lightning_ksm.demo.planted`` (the demo uses it too).
"""

from __future__ import annotations

import types

import numpy as np

from lightning_ksm import all_subsets
from lightning_ksm.features import HarvestedFeatures

# -- planted functions F(S) of the subset indicators ------------------------------------------------
def additive(K: int, seed: int = 0):
    """F(s) = 1 - sum_k w_k s_k: removing task k raises the loss by w_k (its true score)."""
    w = np.random.default_rng(seed).normal(0.0, 1.0, size=K)
    return (lambda S: 1.0 - np.asarray(S, float) @ w), w


def pairwise(K: int, pair=(1, 4), strength: float = 3.0, seed: int = 0):
    """Weak additive effects plus a synergistic pair: the loss drops only when BOTH tasks are in."""
    w = 0.1 * np.random.default_rng(seed).normal(size=K)
    i, j = pair

    def F(S):
        S = np.asarray(S, float)
        return 1.0 - S @ w - strength * S[:, i] * S[:, j]

    return F


def xor(K: int, pair=(0, 3), strength: float = 3.0, seed: int = 0):
    """A loss that is low when exactly one of the two tasks is present (an XOR interaction)."""
    w = 0.1 * np.random.default_rng(seed).normal(size=K)
    i, j = pair

    def F(S):
        S = np.asarray(S, float)
        return 1.0 - S @ w - strength * np.abs(S[:, i] - S[:, j])

    return F


def split(K: int, m: int, seed: int = 0):
    """m random distinct training subsets and all remaining subsets of {0,1}^K as held-out set."""
    every = all_subsets(K)
    order = np.random.default_rng(seed).permutation(len(every))
    return every[order[:m]], every[order[m:]]


planted = types.SimpleNamespace(additive=additive, pairwise=pairwise, xor=xor, split=split)

# -- feature factories ------------------------------------------------------------------------------
GRADEX_TASK_SIZES = [10, 40, 25, 60, 15]  # deliberately unbalanced
GRADEX_SCALE = 5  # the structure scale of the features (the number of tasks in the default design)
GRADEX_LOSS_MODES = {"cross_entropy": "logits", "logistic": "logistic", "squared": "regression"}


def gradex_features(loss, seed, sizes=GRADEX_TASK_SIZES, k=8, C=3, vector_regression=False):
    """A random linearized problem: features with structure so the solution is far from 0."""
    rng = np.random.default_rng(seed)
    tid = np.concatenate([np.full(s, t) for t, s in enumerate(sizes)])
    n = len(tid)
    if loss == "cross_entropy" or vector_regression:
        J = rng.normal(size=(n, C, k)) + 0.5 * tid[:, None, None] / GRADEX_SCALE
        f0 = 0.5 * rng.normal(size=(n, C))
        if loss == "cross_entropy":
            y = (np.einsum("nck,k->nc", J, rng.normal(size=k)).argmax(1) + tid) % C
        else:
            y = rng.normal(size=(n, C)) + tid[:, None] / GRADEX_SCALE
    else:
        J = rng.normal(size=(n, k)) + 0.3 * tid[:, None] / GRADEX_SCALE
        f0 = 0.5 * rng.normal(size=n)
        if loss == "logistic":
            y = ((J @ rng.normal(size=k) + tid - 2 + rng.normal(size=n)) > 0).astype(float)
        else:
            y = J @ rng.normal(size=k) + tid + rng.normal(size=n)
    names = [f"task{t}" for t in range(len(sizes))]
    return HarvestedFeatures(f0, J, y, tid, names, GRADEX_LOSS_MODES[loss])


def regression_features(seed=0, n=80, k=12):
    """Linear regression in the linearized space: f0 = 0, J = x. Task 0 follows the target's rule,
    task 1 the opposite rule, task 2 an unrelated one."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=k)
    rules = [w, -w, rng.normal(size=k)]
    X = rng.normal(size=(3 * n, k))
    t = np.repeat(np.arange(3), n)
    y = np.einsum("ij,ij->i", X, np.array(rules)[t]) + 0.1 * rng.normal(size=3 * n)
    source = HarvestedFeatures(np.zeros(3 * n), X, y, t, ["same", "opposite", "unrelated"], "regression")
    Xt = rng.normal(size=(60, k))
    target = HarvestedFeatures(np.zeros(60), Xt, Xt @ w, np.zeros(60, dtype=int), ["target"], "regression")
    return source, target

