"""GradEx's simulated trajectory in float32 against float64: speed and agreement.

On the fidelity harness's cached features (``benchmarks/gradex_fidelity.py``: modular addition and
x^2+xy+y^2, W0 seeds 0 and 1, the callback's default features: one SJLT draw of 1024, preconditioned,
exact readout), ``simulate(..., calibrate="effect")`` runs in both dtypes, interleaved, best of 2;
reported: seconds, the largest relative difference of F^ over the 100 subsets + all tasks, and the
Spearman of each with the real F on the evaluation half.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/simulate_precision.py

writes ``benchmarks/results/simulate_precision.json``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gradex_fidelity as gf  # noqa: E402
from _common import write_results  # noqa: E402

from lightning_ksm.estimation import simulate  # noqa: E402


def main():
    torch.set_num_threads(1)
    cfg = replace(gf.ma.FULL, n_subsets=100)
    rows = []
    for seed in (0, 1):
        for op in ("add", "quad"):
            tr = gf.modular_truth(cfg, op, seed, 2, os.path.join(gf.ROOT, "modular"), log=lambda *a: None)
            data, S, obs = tr["data"], tr["subsets"], tr["observed"]
            truth = np.stack([r.column("all") for r in tr["reals"]]).mean(0)
            fdir = os.path.join(tr["run_dir"], "features")
            z = np.load(os.path.join(fdir, "readout-pre.npz"))
            src = gf.with_readout(gf._load_feats(os.path.join(fdir, "source-sjlt1024-pre-d0.npz")), z["readout"],
                                  [str(c) for c in z["columns"]])
            tgt = dataclasses.replace(gf._load_feats(os.path.join(fdir, "target-sjlt1024-pre-d0.npz")),
                                      preconditioned=True)
            run = gf.modular_run_record(cfg, len(data.train), obs)
            SA = gf._with_all(S)[:, gf._order(src, data.group_names)]
            best, est = {}, {}
            for _ in range(2):
                for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
                    t = time.perf_counter()
                    est[name] = simulate(src, tgt, SA, run, calibrate="effect", dtype=dt).column("all")
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t)
            ev = np.arange(len(S) // 2, len(S))
            a, b = est["float64"], est["float32"]
            rows.append({"op": op, "seed": seed, "seconds": best, "speedup": best["float64"] / best["float32"],
                         "max_relative_difference": float(np.max(np.abs(a - b) / np.abs(a))),
                         "spearman_float64_vs_float32": gf._spearman(a, b),
                         "spearman_vs_real_evaluation_half": {"float64": gf._spearman(a[:-1][ev], truth[ev]),
                                                              "float32": gf._spearman(b[:-1][ev], truth[ev])}})
            print(rows[-1], flush=True)
    write_results("simulate_precision", {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/simulate_precision.py", "threads": 1,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
