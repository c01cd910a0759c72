"""Does the kernel surrogate's default (gamma, alpha) selection hold on real per-sample targets?

Data: real retrainings of the modular-arithmetic recipe (``benchmarks/grouping_data.py``: p = 97,
``quad``, 25 grid-cell tasks, 60 fine-tuning steps from a pretrained W0), 80 distinct subsets at
ratio 0.9. Each training records the test loss of every one of the 941 test samples (the
per-sample target columns), of every test-set grid cell (25 columns) and overall.

Splits: the first 40 subsets fit the surrogate (the paper's design), subsets 41-60 are the
*tuning* split (used while choosing the selection criterion), subsets 61-80 are *held out* and
reported. Compared: the default (``selection="lds"``), the earlier default (leave-one-out MSE,
``selection="mse"``) and the paper's fixed settings (RBF, gamma = 1/K, alpha = 1e-2 and 0.1).
The planted problems of ``tests/test_surrogates.py`` are scored the same way.

    python benchmarks/grouping_data.py modular      # the trainings (cached under runs/grouping)
    python benchmarks/surrogate_selection.py        # writes benchmarks/results/surrogate_selection.json
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks._common import write_results  # noqa: E402
from benchmarks.grouping_data import RUNS, Cache, modular_designs  # noqa: E402
from lightning_ksm import KernelSurrogate, LinearSurrogate, lds, sample_subsets  # noqa: E402
from lightning_ksm.metrics import residual_error  # noqa: E402

N_SAMPLES, N_CELLS = 941, 25


def candidates(K: int) -> dict:
    return {
        "default (loo-lds)": lambda: KernelSurrogate(),
        "loo-mse (earlier default)": lambda: KernelSurrogate(selection="mse"),
        "paper gamma=1/K alpha=1e-2": lambda: KernelSurrogate(gamma=1.0 / K, alpha=1e-2),
        "paper gamma=1/K alpha=0.1": lambda: KernelSurrogate(gamma=1.0 / K, alpha=0.1),
        "linear": lambda: LinearSurrogate(),
    }


def modular_table() -> dict:
    dense = modular_designs()["dense"]
    cache = Cache(os.path.join(RUNS, "modular"))
    F = np.stack([cache.get(m) for m in dense])
    fit, tune, held = slice(0, 40), slice(40, 60), slice(60, 80)
    K = dense.shape[1]
    cols = {"per-sample (941 columns)": slice(0, N_SAMPLES), "per-cell (25 columns)": slice(N_SAMPLES, N_SAMPLES + N_CELLS),
            "all (1 column)": slice(N_SAMPLES + N_CELLS, N_SAMPLES + N_CELLS + 1)}
    out = {}
    for cname, c in cols.items():
        row = {}
        for name, make in candidates(K).items():
            start = time.perf_counter()
            model = make().fit(dense[fit], F[fit, c])
            seconds = time.perf_counter() - start
            row[name] = {
                "tuning_lds": float(lds(F[tune, c], model.predict(dense[tune]).reshape(20, -1))),
                "heldout_lds": float(lds(F[held, c], model.predict(dense[held]).reshape(20, -1))),
                "heldout_residual_error": float(residual_error(F[held, c], model.predict(dense[held]).reshape(20, -1))),
                "gamma_times_K": None if not hasattr(model, "gamma_") else float(model.gamma_ * K),
                "alpha": None if not hasattr(model, "alpha_") else float(model.alpha_),
                "fit_seconds": seconds,
            }
        out[cname] = row
    return out


def planted_table() -> dict:
    from conftest import planted
    from test_surrogates import _mixed_targets

    out = {}
    rows = []
    for seed in range(3):  # tests/test_surrogates.py::test_default_selection_does_not_lose_to_paper_setting
        K = 12
        F = _mixed_targets(K, 300, seed)
        rng = np.random.default_rng(100 + seed)
        S = sample_subsets(K, 40, p=0.5, seed=seed)
        y = F(S) + 0.1 * rng.normal(size=(40, 300))
        test = sample_subsets(K, 300, p=0.5, seed=1000 + seed)
        truth = F(test)
        rows.append({name: float(lds(truth, make().fit(S, y).predict(test))) for name, make in candidates(K).items()})
    out["mixed 300 columns (LDS, 3 seeds)"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for fn in (planted.pairwise, planted.xor):
        K = 8
        Fn = fn(K)
        vals = []
        for seed in range(3):
            train, test = planted.split(K, 4 * K, seed=seed)
            vals.append({name: float(lds(Fn(test), make().fit(train, Fn(train)).predict(test)))
                         for name, make in candidates(K).items()})
        out[f"{fn.__name__} 1 column (LDS, 3 seeds)"] = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    return out


def main() -> None:
    start = time.perf_counter()
    payload = {
        "command": "python benchmarks/surrogate_selection.py",
        "data": "modular arithmetic p=97 quad, 25 tasks, real retraining (benchmarks/grouping_data.py); "
                "80 subsets at ratio 0.9: 40 fit, 20 tuning, 20 held out",
        "modular_real": modular_table(),
        "planted": planted_table(),
    }
    payload["seconds"] = time.perf_counter() - start
    write_results("surrogate_selection", payload)
    for block in ("modular_real", "planted"):
        for cname, row in payload[block].items():
            print(f"{block} / {cname}")
            for name, v in row.items():
                print(f"   {name:<30} {v if not isinstance(v, dict) else {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items()}}")


if __name__ == "__main__":
    main()
