"""Where the exact target readout helps and where it hurts (issue #10), against a closed form.

The reference is GradEx's own simulation without any projection (identity projector: the exact
linearized model); the question is only how much of the projection's error each readout keeps.
Small MLPs (3 classes, 5 inputs, hidden width 8 or 64: d = 75 / 579 parameters, 160 source samples
in 4 tasks, 40 target samples), SGD with momentum 0.9 from gentle (lr 0.02, 10 steps) to strong
(lr 0.3, 30 steps), Gaussian projections of k = 8 / 32, 4 projection seeds, 16 subsets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readout_regimes.py

writes ``benchmarks/results/readout_regimes.json`` (about 30 s).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import spearman, write_results  # noqa: E402

from lightning_ksm.estimation import simulate  # noqa: E402
from lightning_ksm.harvesting import exact_readout, harvest, projector_for_model  # noqa: E402
from lightning_ksm.subsets import sample_subsets  # noqa: E402

REGIMES = {"gentle": (0.02, 10), "medium": (0.05, 20), "strong": (0.3, 30)}


def problem(hidden: int, seed: int = 2, n: int = 160):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g).double()
    y = torch.randint(0, 3, (n,), generator=g)
    tasks = [int(t) for t in torch.arange(n) % 4]
    xt = torch.randn(40, 5, generator=g).double()
    yt = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    return model, (x, y, tasks), (xt, yt, ["target"] * 40)


def features(model, data, target, projection, k, seed=0):
    proj = projector_for_model(model, projection, k, seed)
    src = harvest(model, [data], projector=proj, mode="margin")
    tgt = harvest(model, [target], projector=proj, mode="margin")
    return src, tgt


def main():
    torch.set_num_threads(1)
    start = time.perf_counter()
    S = sample_subsets(4, 16, p=0.6, seed=1)
    rows = []
    for hidden in (8, 64):
        model, data, target = problem(hidden)
        exact_src, exact_tgt = features(model, data, target, "identity", None)
        readout, cols = exact_readout(model, [data[:2]], [target], mode="margin")
        d = sum(p.numel() for p in model.parameters())
        for regime, (lr, steps) in REGIMES.items():
            run = {"optimizer": {"type": "SGD", "lr": lr, "momentum": 0.9}, "steps": steps}
            truth = simulate(exact_src, exact_tgt, S, run).column("all")
            f0 = float(np.mean(np.logaddexp(0.0, -exact_tgt.outputs)))
            for k in (8, 32):
                err = {"projected": [], "exact_readout": []}
                rank = {"projected": [], "exact_readout": []}
                for seed in range(4):
                    src, tgt = features(model, data, target, "gaussian", k, seed)
                    src_r = dataclasses.replace(src, readout=readout, readout_columns=cols)
                    for name, feats in (("projected", src), ("exact_readout", src_r)):
                        est = simulate(feats, tgt, S, run).column("all")
                        err[name].append(float(np.mean(np.abs(est - truth))))
                        rank[name].append(spearman(est, truth))
                rows.append({
                    "hidden": hidden, "d": d, "regime": regime, "lr": lr, "steps": steps, "k": k,
                    "mean_change_from_w0": float(np.mean(np.abs(truth - f0))),
                    "mean_abs_error": {n: float(np.mean(v)) for n, v in err.items()},
                    "spearman_with_exact": {n: float(np.mean(v)) for n, v in rank.items()},
                    "error_ratio_readout_over_projected": float(np.mean(err["exact_readout"]) / np.mean(err["projected"])),
                })
                r = rows[-1]
                print(f"h={hidden:2d} {regime:6s} k={k:2d}: error projected {r['mean_abs_error']['projected']:.4f} "
                      f"readout {r['mean_abs_error']['exact_readout']:.4f} (x{r['error_ratio_readout_over_projected']:.2f}); "
                      f"Spearman {r['spearman_with_exact']['projected']:.2f} / {r['spearman_with_exact']['exact_readout']:.2f}",
                      flush=True)
    write_results("readout_regimes", {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readout_regimes.py",
        "reference": "GradEx's simulation without a projection (the exact linearized model); SGD momentum 0.9",
        "design": {"subsets": 16, "projection_seeds": 4, "projection": "gaussian", "source_samples": 160,
                   "target_samples": 40, "tasks": 4},
        "rows": rows, "wall_seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
