"""Ground truth for benchmarks/gradex_fidelity.py: real retraining, cached under runs/ (resumable).

Modular arithmetic (recipes/modular_arithmetic.py, its FULL config): per (operation, W0 seed), W0 is
pretrained once (cached), the observed all-tasks run is the recipe's fine-tuning on every task (its
final test losses, weight displacement and AdamW second moments are what a callback can record),
and every evaluation subset is really fine-tuned with ``n_batch_seeds`` batch seeds through
:func:`lightning_ksm.retrain.retrain_subsets` (one JSON record per subset and seed). For the first
batch seed the real weight change W_s - W0 of each subset is kept too (``dw/``, for the oracle rows).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from lightning_ksm.retrain import retrain_subsets
from recipes import modular_arithmetic as ma

__all__ = ["modular_truth", "observed_run", "batch_seeds", "ModularTrainFn"]


def batch_seeds(seed: int, n: int) -> list:
    """The batch seeds of W0 seed ``seed``: the recipe's own (``seed``) first, then others."""
    return [seed] + [1000 + 100 * seed + r for r in range(1, n)]


def _finetune(model, cfg, data, subset, seed):
    """The recipe's fine-tuning (same batches, same optimizer) returning the optimizer too."""
    return ma.finetune(model, cfg, data, subset, seed, return_optimizer=True)


class ModularTrainFn:
    """``train_fn(subset, seed)``: W0 -> the recipe's fine-tuning on the subset -> test losses; when
    ``dw_dir`` is set, W_s - W0 is saved there as ``<hash of subset>.pt``."""

    def __init__(self, cfg, data, w0, dw_dir=None):
        self.cfg, self.data, self.w0, self.dw_dir = cfg, data, w0, dw_dir

    def __call__(self, subset, seed):
        model = ma.new_model(self.cfg, 0)
        model.load_state_dict(self.w0)
        model, _ = _finetune(model, self.cfg, self.data, subset, seed)
        if self.dw_dir is not None:
            os.makedirs(self.dw_dir, exist_ok=True)
            dw = {k: (v.detach() - self.w0[k]).clone() for k, v in model.named_parameters()}
            torch.save(dw, os.path.join(self.dw_dir, subset_key(subset) + ".pt"))
        return ma.evaluate(model, self.data)


def subset_key(subset) -> str:
    return "".join("1" if b else "0" for b in np.asarray(subset, dtype=bool))


def observed_run(cfg, data, w0, seed, path):
    """The all-tasks run a callback watches (cached in ``path``): final test losses, |W_T - W0|,
    the optimizer's second moments and step count, and the real weight change."""
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    model = ma.new_model(cfg, 0)
    model.load_state_dict(w0)
    start = time.perf_counter()
    model, opt = _finetune(model, cfg, data, np.ones(cfg.n_tasks, dtype=bool), seed)
    seconds = time.perf_counter() - start
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    exp_avg_sq, steps = {}, 0
    for n in names:
        st = opt.state.get(params[n], {})
        if "exp_avg_sq" in st:
            exp_avg_sq[n] = st["exp_avg_sq"].detach().clone()
            steps = int(st["step"])
    dw = {n: (params[n].detach() - w0[n]).clone() for n in names}
    out = {
        "losses": ma.evaluate(model, data), "seconds": seconds, "exp_avg_sq": exp_avg_sq, "steps": steps,
        "displacement": float(torch.sqrt(sum((d.double() ** 2).sum() for d in dw.values()))), "dw": dw,
    }
    torch.save(out, path)
    return out


def modular_truth(cfg, op, seed, n_batch_seeds, root, log=print):
    """W0, the observed run and the real F of every evaluation subset for every batch seed."""
    run_dir = os.path.join(root, op, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    data = ma.make_data(cfg, op, seed)
    w0_path = os.path.join(run_dir, "w0.pt")
    if os.path.exists(w0_path):
        w0 = torch.load(w0_path, weights_only=True)
        pre_s = json.load(open(w0_path + ".json"))["seconds"]
    else:
        t = time.perf_counter()
        w0 = ma.pretrain(cfg, data, seed)
        pre_s = time.perf_counter() - t
        torch.save(w0, w0_path)
        with open(w0_path + ".json", "w") as fh:
            json.dump({"seconds": pre_s}, fh)
    log(f"[{op} seed {seed}] W0 ready (pretraining {pre_s:.0f}s)")
    obs = observed_run(cfg, data, w0, seed, os.path.join(run_dir, "observed.pt"))
    S = ma.evaluation_subsets(cfg, seed)
    reals = []
    for r, bs in enumerate(batch_seeds(seed, n_batch_seeds)):
        fn = ModularTrainFn(cfg, data, w0, os.path.join(run_dir, "dw") if r == 0 else None)
        res = retrain_subsets(fn, S, directory=os.path.join(run_dir, f"retrain-b{bs}"), seed=bs,
                              task_names=data.group_names)
        log(f"[{op} seed {seed}] batch seed {bs}: {res.n_trained} trained now, {res.training_seconds:.0f}s in all")
        reals.append(res)
    return {"data": data, "w0": w0, "observed": obs, "subsets": S, "reals": reals, "pretrain_seconds": pre_s,
            "run_dir": run_dir}
