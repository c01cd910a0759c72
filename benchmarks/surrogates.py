"""Surrogate benchmark: fit+predict time of KernelSurrogate with automatic selection, and LDS of
linear vs kernel surrogates on planted problems.

Run: .venv/bin/python benchmarks/surrogates.py [--quick]
Writes benchmarks/results/surrogates.json.

Baselines in the same run (ratios, since machines are noisy):
- the same kernel ridge with the paper's fixed (gamma=1/K, alpha=0.1): the cost of selection;
- scikit-learn GridSearchCV(KernelRidge) over the same grid with 5-fold CV (only where it finishes
  in reasonable time): what our closed-form leave-one-out selection saves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import best_time, write_results  # noqa: E402

from lightning_ksm import KernelSurrogate, LinearSurrogate, lds, sample_subsets  # noqa: E402
from lightning_ksm.surrogates import DEFAULT_ALPHA_GRID, default_gamma_grid  # noqa: E402


def targets(S: np.ndarray, T: int, seed: int) -> np.ndarray:
    """T target columns with additive and pairwise effects, the shape of real F^(s) tables."""
    rng = np.random.default_rng(seed)
    K = S.shape[1]
    W = rng.normal(size=(K, T)) / np.sqrt(K)
    i, j = rng.integers(0, K, size=(2, T))
    return S @ W + S[:, i] * S[:, j] + 0.05 * rng.normal(size=(len(S), T))


def timing(quick: bool) -> list[dict]:
    rows = []
    ms = [40, 200] if quick else [40, 200, 1000]
    for m in ms:
        for K in [10, 50, 500]:
            for T in [1, 500]:
                S = sample_subsets(K, m, p=0.5, seed=0).astype(float)
                y = targets(S, T, seed=1)
                y = y[:, 0] if T == 1 else y
                test = sample_subsets(K, 200, p=0.5, seed=2)

                def auto():
                    KernelSurrogate().fit(S, y).predict(test)

                def fixed():
                    KernelSurrogate(gamma=1.0 / K, alpha=0.1).fit(S, y).predict(test)

                repeats = 1 if m == 1000 else 3
                t_auto, t_fixed = best_time(auto, repeats), best_time(fixed, repeats)
                row = {
                    "m": m, "K": K, "T": T,
                    "fit_predict_s_auto_selection": t_auto,
                    "fit_predict_s_fixed_params": t_fixed,
                    "selection_overhead_ratio": t_auto / t_fixed,
                }
                # GridSearchCV baseline on the same grid, only where it takes under a minute or so.
                if T == 1 and m <= 200:
                    from sklearn.kernel_ridge import KernelRidge
                    from sklearn.model_selection import GridSearchCV

                    grid = {"gamma": list(default_gamma_grid(K)), "alpha": list(DEFAULT_ALPHA_GRID)}
                    start = time.perf_counter()
                    GridSearchCV(KernelRidge(kernel="rbf"), grid, cv=5).fit(S, y - y.mean())
                    row["sklearn_gridsearchcv_s"] = time.perf_counter() - start
                    row["speedup_vs_gridsearchcv"] = row["sklearn_gridsearchcv_s"] / t_auto
                rows.append(row)
                print(row, flush=True)
    return rows


def accuracy(seeds: int) -> list[dict]:
    from conftest import planted

    rows = []
    K = 8
    problems = {
        "additive": lambda: planted.additive(K)[0],
        "pairwise": lambda: planted.pairwise(K),
        "xor": lambda: planted.xor(K),
    }
    for name, make in problems.items():
        F = make()
        lin, ker = [], []
        for seed in range(seeds):
            train, test = planted.split(K, 4 * K, seed=seed)
            lin.append(lds(F(test), LinearSurrogate().fit(train, F(train)).predict(test)))
            ker.append(lds(F(test), KernelSurrogate().fit(train, F(train)).predict(test)))
        rows.append({
            "problem": name, "K": K, "m_train": 4 * K, "n_heldout": 2**K - 1 - 4 * K, "seeds": seeds,
            "lds_linear_mean": float(np.mean(lin)), "lds_linear_std": float(np.std(lin)),
            "lds_kernel_mean": float(np.mean(ker)), "lds_kernel_std": float(np.std(ker)),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip m=1000 (for a smoke run)")
    args = parser.parse_args()
    start = time.perf_counter()
    payload = {
        "command": "python benchmarks/surrogates.py" + (" --quick" if args.quick else ""),
        "timing": timing(args.quick),
        "planted_lds": accuracy(seeds=5),
    }
    payload["total_s"] = time.perf_counter() - start
    write_results("surrogates" + ("_quick" if args.quick else ""), payload)


if __name__ == "__main__":
    main()
