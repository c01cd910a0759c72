"""Planted task-subset functions with known ground truth, shared by the surrogate tests."""

from __future__ import annotations

import numpy as np

from lightning_ksm import all_subsets


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
