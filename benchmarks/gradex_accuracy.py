"""GradEx accuracy against real fine-tuning, as the projection dimension k and lambda vary.

Setting (like tests/test_gradex_finetune.py, a bit larger): an MLP 2-32-32-2 (tanh, d = 1,218
parameters) is pretrained on a related task, then REALLY fine-tuned from W0 on m = 24 random
subsets of K = 8 tasks (full batch, Adam with cosine decay, 300 steps, the task-weighted loss of
eq. 1 plus lam/2 |W - W0|^2). Each task is its own region of the plane with its own boundary and
label-noise level; the target is a region between tasks 1 and 2. F(s) is the target
cross-entropy after fine-tuning.

GradEx estimates F^(s) from features harvested once at W0 with ``lightning_ksm.harvest()`` and the
seeded projectors of ``lightning_ksm.harvesting.projection`` (``gaussian`` and ``sjlt``; 3 projection seeds
each) for k in {32, 64, 128, 256, 512}, and with exact Jacobians (identity projector, k = d).
Reported per (lam, projector, k): the median over subsets of |F^ - F| / F and the Spearman
correlation across subsets, averaged over seeds (min and max too), plus the GradEx time.

Run: ``.venv/bin/python benchmarks/gradex_accuracy.py`` (about 40 s on 2 CPU cores with 1 torch thread);
writes ``benchmarks/results/gradex_accuracy.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import write_results  # noqa: E402

from lightning_ksm.estimation import gradex  # noqa: E402
from lightning_ksm.harvesting import harvest, projector_for_model  # noqa: E402
from lightning_ksm.retrain import proximal_finetune  # noqa: E402

K = 8


def task_data(angle, tilt, noise, n, gen):
    """Points around ``angle`` on a circle of radius 1.5, labelled by a tilted line, some flipped."""
    center = 1.5 * torch.tensor([math.cos(angle), math.sin(angle)])
    x = center + torch.randn(n, 2, generator=gen)
    normal = torch.tensor([math.cos(angle + tilt), math.sin(angle + tilt)])
    y = ((x - center) @ normal > 0).long()
    flip = torch.rand(n, generator=gen) < noise
    return x, torch.where(flip, 1 - y, y)


def make_problem(n_per_task, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    angles = [2 * math.pi * t / K for t in range(K)]
    tilts = [0.6 if t % 2 else -0.6 for t in range(K)]
    noises = [0.05 * (t % 4) for t in range(K)]
    xs, ys, ts = [], [], []
    for t in range(K):
        x, y = task_data(angles[t], tilts[t], noises[t], n_per_task, gen)
        xs.append(x), ys.append(y), ts.append(torch.full((n_per_task,), t))
    source = (torch.cat(xs), torch.cat(ys), torch.cat(ts))
    target = task_data(2 * math.pi * 1.5 / K, 0.6, 0.0, 400, gen)
    pre_x, pre_y = [], []
    for t in range(K):  # related pretraining: same regions, odd tasks' labels flipped
        x, y = task_data(angles[t], tilts[t], 0.0, 100, gen)
        pre_x.append(x), pre_y.append(y if t % 2 == 0 else 1 - y)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    px, py = torch.cat(pre_x), torch.cat(pre_y)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(px), py).backward()
        opt.step()
    return model, source, target


def finetune(model, W0, source, target, subset, lam, steps, lr):
    """Target loss after really fine-tuning from W0 on the subset."""
    X, Y, T = source
    params = proximal_finetune(model, W0, X, Y, T, subset, n_tasks=K, lam=lam, steps=steps, lr=lr)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(functional_call(model, params, (target[0],)), target[1]).item()


def harvest_pair(model, source, target, kind, k, seed):
    projector = projector_for_model(model, projection=kind, k=k, seed=seed)
    X, Y, T = source
    src = harvest(model, [(X, Y, T)], projector=projector, mode="logits", task_names=list(range(K)))
    tgt = harvest(model, [(target[0], target[1], torch.zeros(len(target[1]), dtype=torch.long))],
                  projector=projector, mode="logits")
    return src, tgt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=24)
    ap.add_argument("--n-per-task", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--kinds", nargs="+", default=["gaussian", "sjlt"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the tensors are tiny, and the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    start_all = time.perf_counter()
    model, source, target = make_problem(args.n_per_task, args.hidden, seed=0)
    W0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    d = sum(v.numel() for v in W0.values())
    rng = np.random.default_rng(0)
    S = rng.random((args.m, K)) < 0.5
    S[~S.any(axis=1), 0] = True

    features = {("identity", d, 0): harvest_pair(model, source, target, "identity", None, 0)}
    for kind in args.kinds:
        for k in args.ks:
            for seed in range(args.seeds):
                features[(kind, k, seed)] = harvest_pair(model, source, target, kind, k, seed)

    rows = []
    finetune_s = 0.0
    for lam in args.lams:
        t0 = time.perf_counter()
        F = np.array([finetune(model, W0, source, target, s, lam, args.steps, args.lr) for s in S])
        finetune_s += time.perf_counter() - t0
        print(f"lam={lam}: real F(s) in [{F.min():.3f}, {F.max():.3f}]", flush=True)
        groups = {}
        for (kind, k, seed), (src, tgt) in features.items():
            t0 = time.perf_counter()
            res = gradex(src, tgt, S, lam=lam)
            elapsed = time.perf_counter() - t0
            F_hat = res.column("all")
            groups.setdefault((kind, k), []).append(
                (float(np.median(np.abs(F_hat - F) / F)), float(spearmanr(F, F_hat)[0]), elapsed,
                 bool(res.converged.all()))
            )
        for (kind, k), vals in groups.items():
            rel, rho, secs, conv = map(np.array, zip(*vals))
            row = {
                "lam": lam, "projector": kind, "k": k, "seeds": len(vals),
                "median_rel_error": float(rel.mean()),
                "median_rel_error_min_max": [float(rel.min()), float(rel.max())],
                "spearman": float(rho.mean()),
                "spearman_min_max": [float(rho.min()), float(rho.max())],
                "gradex_s_mean": float(secs.mean()),
                "all_converged": bool(conv.all()),
                "F_range": [float(F.min()), float(F.max())],
            }
            rows.append(row)
            print({k_: v for k_, v in row.items() if k_ not in ("F_range",)}, flush=True)

    payload = {
        "command": "python benchmarks/gradex_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": {
            "model": f"MLP 2-{args.hidden}-{args.hidden}-2 tanh", "d": d, "K": K, "m": args.m,
            "n_per_task": args.n_per_task, "n_target": int(len(target[1])),
            "finetune": f"full-batch Adam lr={args.lr} cosine, {args.steps} steps, task-weighted CE + lam/2|W-W0|^2",
            "harvest": "lightning_ksm.harvest(mode='logits') with lightning_ksm.harvesting.projection projectors "
                       "(identity = exact Jacobians, k = d)",
            "gradex": "defaults (dtype='auto', task weighting, cross-entropy), same lam as the fine-tuning",
            "torch_threads": args.threads,
        },
        "finetune_total_s": finetune_s,
        "total_s": time.perf_counter() - start_all,
        "rows": rows,
    }
    if not args.no_write:
        write_results("gradex_accuracy", payload)
    return payload


if __name__ == "__main__":
    main()
