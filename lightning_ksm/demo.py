"""`make demo`: an attribution demo on a synthetic task problem with known ground truth.

Eight source tasks act on one target loss: two help alone, one hurts (label noise), and two only
help together (a synergistic pair). We sample task subsets, compute the planted loss on each, fit
linear and kernel surrogates, and print the attribution table, the interactions and the best subset.
"""

from __future__ import annotations

import argparse

import numpy as np

from . import (
    KernelSurrogate,
    LinearSurrogate,
    best_subset,
    ensemble_scores,
    interaction_matrix,
    lds,
    loo_scores,
    sample_subsets,
)

TASKS = ["helper-a", "helper-b", "noisy-labels", "pair-left", "pair-right", "neutral-1", "neutral-2", "neutral-3"]


def planted_loss(S: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    S = np.asarray(S, float)
    base = 2.0 - 0.4 * S[:, 0] - 0.3 * S[:, 1] + 0.5 * S[:, 2]
    return base - 0.8 * S[:, 3] * S[:, 4] + 0.02 * rng.normal(size=len(S))


def synthetic_demo(seed: int = 0, n_subsets: int = 40) -> None:
    rng = np.random.default_rng(seed)
    K = len(TASKS)
    S = sample_subsets(K, n_subsets, p=0.5, seed=seed, unique=True)
    y = planted_loss(S, rng)
    test = sample_subsets(K, 200, p=0.5, seed=seed + 1)
    truth = planted_loss(test, np.random.default_rng(seed + 2))
    lin = LinearSurrogate().fit(S, y)
    ker = KernelSurrogate().fit(S, y)
    print(f"Synthetic problem: {K} tasks, {n_subsets} sampled subsets, 200 held-out subsets\n")
    print(f"held-out LDS   linear {lds(truth, lin.predict(test)):.3f}   kernel {lds(truth, ker.predict(test)):.3f}")
    print(f"kernel chose gamma={ker.gamma_:.4g}, alpha={ker.alpha_:.3g} by leave-one-out\n")
    loo, ens = loo_scores(ker), ensemble_scores(ker, seed=seed)
    print(f"{'task':<14}{'LOO score':>11}{'ensemble':>11}   (score > 0: the task helps)")
    for k in np.argsort(-ens):
        print(f"{TASKS[k]:<14}{loo[k]:>11.3f}{ens[k]:>11.3f}")
    I = interaction_matrix(ker)
    i, j = np.unravel_index(np.argmin(I), I.shape)
    print(f"\nstrongest synergy: {TASKS[i]} + {TASKS[j]} (interaction {I[i, j]:.3f}; < 0 means synergy)")
    best = best_subset(ker, size=4)
    print(f"best 4-task subset: {', '.join(TASKS[t] for t in best.tasks)} (predicted loss {best.predicted_loss:.3f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="lightning-ksm attribution demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    synthetic_demo(seed=args.seed)


if __name__ == "__main__":
    main()
