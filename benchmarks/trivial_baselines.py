"""The trivial baselines of docs/results.md, computed from the committed results files (no training).

Every table of real retraining must show what needs no attribution at all:

- ``-|s|`` ("more tasks = lower loss"): the predicted loss is minus the number of tasks;
- rank correlation **within subset size** (the size partialled out of both rankings): the part of
  a ranking a user cannot get by counting tasks. For -|s| it is 0 by construction;
- for per-task RL targets, ``target in s``: the predicted loss of target t is -1 when t is trained on.

Sections: 1 (modular arithmetic, ``modular_arithmetic.json``: the 60 and the 10 held-out subsets,
GradEx itself next to -|s|), 3 (Meta-World, ``mt10.json``: every evaluation subset has 4 tasks, so
-|s| is undefined there and ``target in s`` is the baseline). Section 0 (``gradex_fidelity.json``)
has these rows already.

Run: ``python benchmarks/trivial_baselines.py`` -> ``benchmarks/results/trivial_baselines.json``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from benchmarks._common import RESULTS, partial_spearman, write_results  # noqa: E402


def spearman(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # a constant ranking has no rank correlation
    return float(spearmanr(a, b).correlation)


def _mean_std(values):
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "values": values}


def modular() -> dict:
    d = json.load(open(RESULTS / "modular_arithmetic.json"))
    n_fit = d["config"]["n_fit"]
    out = {}
    for op in d["ops"]:
        rows = {}
        for name, held in (("held_out_60", slice(n_fit, None)), ("held_out_10", slice(n_fit, n_fit + 10))):
            cells = {k: [] for k in ("minus_size", "gradex", "gradex_within_size", "size_range")}
            for r in (r for r in d["runs"] if r["op"] == op):
                S = np.asarray(r["subsets"], bool)[held]
                real, est = np.asarray(r["real_all"])[held], np.asarray(r["gradex_all"])[held]
                size = S.sum(1)
                cells["minus_size"].append(spearman(real, -size))
                cells["gradex"].append(spearman(real, est))
                cells["gradex_within_size"].append(partial_spearman(real, est, size))
                cells["size_range"].append([int(size.min()), int(size.max())])
            rows[name] = {k: (_mean_std(v) if k != "size_range" else v) for k, v in cells.items()}
        out[op] = rows
    return {"source": "benchmarks/results/modular_arithmetic.json", "note": "real = the overall test loss; "
            "seeds as in that file; minus_size's within-size correlation is 0 by construction", "ops": out}


def metaworld(name: str = "mt10.json") -> dict:
    d = json.load(open(RESULTS / name))
    tasks = d["config"]["tasks"]
    subsets = [[t in s for t in tasks] for s in d["evaluation_subsets"]]
    S = np.asarray(subsets, bool)
    F = -np.asarray(d["true_returns"], float)
    per_target = {t: spearman(F[:, j], -S[:, j].astype(float)) for j, t in enumerate(tasks)}
    vals = [v for v in per_target.values() if v is not None]
    sizes = S.sum(1)
    return {"source": f"benchmarks/results/{name}", "subset_sizes": sorted(set(int(x) for x in sizes)),
            "minus_size": None if np.ptp(sizes) == 0 else spearman(F.mean(1), -sizes),
            "minus_size_note": "undefined: every evaluation subset has the same number of tasks" if np.ptp(sizes) == 0
            else None,
            "target_in_subset": {"mean_over_targets": float(np.mean(vals)) if vals else None, "per_target": per_target}}


def main() -> dict:
    payload = {"command": "python benchmarks/trivial_baselines.py", "section_1_modular": modular(),
               "section_3_metaworld_6_tasks": metaworld("mt10.json")}
    write_results("trivial_baselines", payload)
    print(json.dumps({op: {k: {kk: vv["mean"] for kk, vv in v.items() if isinstance(vv, dict)} for k, v in rows.items()}
                      for op, rows in payload["section_1_modular"]["ops"].items()}, indent=1))
    print(json.dumps(payload["section_3_metaworld_6_tasks"]["target_in_subset"], indent=1))
    return payload


if __name__ == "__main__":
    main()
