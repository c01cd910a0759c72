"""Helpers shared by the benchmark scripts: timing and writing results files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spearman(a, b) -> float:
    """Spearman correlation, 0.0 where it is undefined (a constant ranking)."""
    import warnings

    import numpy as np
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(a, b).correlation
    return float(r) if np.isfinite(r) else 0.0


def partial_spearman(a, b, size) -> float:
    """Rank correlation of a and b with the subset size partialled out (ranks, then residuals):
    the part of a ranking a user cannot get by counting tasks."""
    import numpy as np
    from scipy.stats import rankdata

    ra, rb, rs = rankdata(a), rankdata(b), rankdata(size)
    if np.ptp(rs) == 0:
        return spearman(a, b)
    X = np.column_stack([np.ones_like(rs), rs])
    res = [r - X @ np.linalg.lstsq(X, r, rcond=None)[0] for r in (ra, rb)]
    den = np.linalg.norm(res[0]) * np.linalg.norm(res[1])
    return float(res[0] @ res[1] / den) if den > 0 else 0.0


def best_time(fn, repeats: int = 3) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (the least noisy figure on a shared box)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
