"""GradEx analysis time as the data grows, as a multiple of one plain training epoch (issue #25 item 1).

The model: an MLP 256-1024-1024-10 (1.32M parameters). At each n (source samples, K = 8 tasks of
equal size) one plain training epoch (Adam, batch 64, cross-entropy) is timed, and then the
``simulate`` analysis of the callback's defaults on features of that n: ``proj_dim`` 1,024 x 2
projection draws, preconditioned with the exact target readout (2 columns), margin mode, 200
subsets at p = 0.75 (+ the all-tasks run), the watched run recorded as 3 epochs of Adam at batch
64; 1,000 target samples. ``simulate_batches="full"`` (every sample at every simulated step) and
``"run"`` (the run's minibatches; ``run``: one batch order, ``run4``: the mean over four,
``simulate_batch_orders=4``) and ``"reduced"`` (those minibatches with SVRG's variance reduction)
are timed in the same process, one thread (``torch`` and BLAS),
in CPU seconds of the process (the machine is shared: wall time would count the neighbours; the
training epoch is the best of two).
The features are random (the cost does not depend on their values; the harvest, a per-sample
gradient pass linear in n, is not part of the analysis timed here). ``*_epochs``: the analysis in
training epochs; ``*_epochs_per_simulated_epoch``: that over the 3 simulated epochs. The full-batch path stops at
``--full-max`` samples (its cost grows as n^2). Log-log slopes are least-squares fits of
log(seconds) on log(n).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gradex_scaling.py`` (about 6 minutes on one
loaded core); writes ``benchmarks/results/gradex_scaling.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import write_results  # noqa: E402

from lightning_ksm.config import AnalysisConfig, HarvestConfig  # noqa: E402
from lightning_ksm.estimation import estimate_subsets  # noqa: E402
from lightning_ksm.features import HarvestedFeatures  # noqa: E402
from lightning_ksm.subsets import sample_subsets  # noqa: E402

K, DIM, HIDDEN, C, BATCH, EPOCHS, M, N_TARGET = 8, 256, 1024, 10, 64, 3, 200, 1000


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, C))


def training_epoch(n: int) -> float:
    """Seconds of one plain training epoch on n samples (Adam, batch 64)."""
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, DIM, generator=g), torch.randint(0, C, (n,), generator=g)
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t = time.process_time()
    order = torch.randperm(n, generator=g)
    for b in range(0, n, BATCH):
        idx = order[b:b + BATCH]
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.process_time() - t


def features(n: int, k: int, draws: int, seed: int, source: bool) -> HarvestedFeatures:
    rng = np.random.default_rng(seed)
    J = (rng.standard_normal((n, 1, k * draws)) / np.sqrt(k)).astype(np.float32)
    f0 = rng.standard_normal((n, 1)).astype(np.float32)
    tasks = np.arange(n) % K if source else np.zeros(n, dtype=np.int64)
    names = [f"task{t}" for t in range(K)] if source else ["target"]
    extra = {}
    if source:
        extra = {"readout": (rng.standard_normal((n, 1, 2)) * 1e-3).astype(np.float32),
                 "readout_columns": ["target", "all"]}
    return HarvestedFeatures(outputs=f0, jacobians=J, labels=np.ones(n, dtype=np.float32), task_ids=tasks,
                             task_names=names, mode="margin", preconditioned=True, projection_draws=draws, **extra)


VARIANTS = {"full": ("full", 1), "run": ("run", 1), "run4": ("run", 4), "reduced": ("reduced", 1)}  # simulate_batches, batch orders


def analysis(n: int, variant: str) -> float:
    hc = HarvestConfig()
    src = features(n, hc.proj_dim, hc.proj_draws, 1, True)
    tgt = features(N_TARGET, hc.proj_dim, hc.proj_draws, 2, False)
    S = sample_subsets(K, M, p=AnalysisConfig().subset_p, seed=0)
    run = {"optimizer": {"type": "Adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}, "epoch_based": True,
           "epochs": EPOCHS, "steps": EPOCHS * -(-n // BATCH), "batch_size": BATCH, "accumulate_grad_batches": 1,
           "final_losses": {"target": 0.6, "all": 0.6}}
    batches, orders = VARIANTS[variant]
    cfg = replace(AnalysisConfig(), estimator="simulate", simulate_batches=batches, simulate_batch_orders=orders)
    t = time.process_time()
    estimate_subsets(src, tgt, S, cfg, run=run)
    return time.process_time() - t


def slope(ns, secs) -> float:
    return float(np.polyfit(np.log(ns), np.log(secs), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--full-max", type=int, default=4096, help="largest n timed with simulate_batches='full'")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for n in args.n:
        row = {"n": n, "training_epoch_seconds": min(training_epoch(n) for _ in range(2))}
        for batches in ("run", "run4", "reduced", "full"):
            if batches == "full" and n > args.full_max:
                continue
            sec = analysis(n, batches)
            row[f"{batches}_seconds"] = sec
            row[f"{batches}_epochs"] = sec / row["training_epoch_seconds"]
            row[f"{batches}_epochs_per_simulated_epoch"] = row[f"{batches}_epochs"] / EPOCHS
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    out = {"rows": rows}
    for batches in ("run", "run4", "reduced", "full"):
        done = [r for r in rows if f"{batches}_seconds" in r]
        if len(done) >= 2:
            ns = [r["n"] for r in done]
            out[f"{batches}_slope_seconds"] = slope(ns, [r[f"{batches}_seconds"] for r in done])
            out[f"{batches}_slope_epochs"] = slope(ns, [r[f"{batches}_epochs"] for r in done])
            out[f"{batches}_slope_over"] = ns
    out["training_slope_seconds"] = slope([r["n"] for r in rows], [r["training_epoch_seconds"] for r in rows])
    write_results("gradex_scaling", {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gradex_scaling.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"model": "MLP 256-1024-1024-10", "parameters": sum(p.numel() for p in model().parameters()),
                  "tasks": K, "subsets": M, "subset_p": AnalysisConfig().subset_p, "epochs": EPOCHS, "batch": BATCH,
                  "proj_dim": HarvestConfig().proj_dim, "proj_draws": HarvestConfig().proj_draws,
                  "target_samples": N_TARGET, "threads": 1,
                  "timed": "CPU seconds: estimate_subsets (simulate, the callback's analysis defaults) vs one Adam epoch (best of 2)"},
        **out, "total_wall_seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
