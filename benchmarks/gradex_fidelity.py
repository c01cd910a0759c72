"""GradEx fidelity: estimators of F(s) against real retraining (issue #10).

Two problems:

1. **Modular arithmetic** (recipes/modular_arithmetic.py, FULL config: the 422k-parameter
   transformer, W0 = 600 AdamW steps, the watched run = 60 AdamW steps at lr 3e-5, batch 256,
   step-based), both operations, W0 seeds ``--seeds``; ``--subsets`` subsets at the recipe's ratio
   0.9, each really retrained with ``--batch-seeds`` batch seeds (the ground truth is their mean).
2. **A project-like problem** (benchmarks/_fidelity_project.py): 10 sources with 2 planted
   harmful and 2 helpful ones, 5 epochs of Adam (epoch-based); all-tasks, the 10 leave-one-out
   subsets and 60 random ones, 3 batch seeds.

Subsets are split in a tuning half (the first half of the random subsets) and an evaluation half;
the one tuned constant (``*_tuned`` rows: a learning-rate factor) is chosen on the tuning half only.
Every estimator is scored on the evaluation half against the multi-seed mean of the real F: Spearman,
Spearman within subset size (partial rank correlation with |s| partialled out), median relative
error raw and anchored (``F_obs(all) + F^(s) - F^(all)``), std ratio, KernelSM held-out LDS
(kernel surrogate fitted on the estimator's F^ of the tuning half, scored on the evaluation half),
and wall time next to real retraining. The noise ceiling is the seed-to-seed Spearman of real F.

Real retrainings, W0s, observed runs and harvested features are cached under
``runs/gradex_fidelity/`` (resumable). Command (2 shared cores, one thread):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gradex_fidelity.py

writes ``benchmarks/results/gradex_fidelity.json``; ``--tables`` prints the docs' tables from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import partial_spearman, spearman, write_results  # noqa: E402
from _fidelity_project import HARMFUL, HELPFUL, project_truth  # noqa: E402
from _fidelity_truth import modular_truth, subset_key  # noqa: E402

from lightning_ksm.config import AnalysisConfig, HarvestConfig  # noqa: E402
from lightning_ksm.estimation import estimate_subsets, gradex, simulate  # noqa: E402
from lightning_ksm.features import HarvestedFeatures  # noqa: E402
from lightning_ksm.harvesting import exact_readout, harvest, projector_for_model  # noqa: E402
from lightning_ksm.harvesting.readout import preconditioned_projector  # noqa: E402
from lightning_ksm.quality import heldout_scores  # noqa: E402
from lightning_ksm.surrogates import KernelSurrogate  # noqa: E402
from recipes import modular_arithmetic as ma  # noqa: E402

ROOT = os.path.join("runs", "gradex_fidelity")
# simulate_readout_effect with the run's minibatches (one batch order, and the mean over four)
# the callback's defaults with simulate_batches (kind, batch orders) other than full
_DEFAULT_BATCH_ROWS = {"default_run": ("run", 1), "default_run4": ("run", 4), "default_reduced": ("reduced", 1)}
_RUN_BATCH_ROWS = {"simulate_readout_effect_run": {"batches": "run"},
                   "simulate_readout_effect_run4": {"batches": "run", "batch_orders": 4}}
LR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)


# -- metrics ---------------------------------------------------------------------------------------
_spearman = spearman  # the shared metrics of benchmarks/_common.py


def score(S, est, est_all, truth, f_obs_all, fit, ev) -> dict:
    """Every metric of one estimator (``est``: F^ on the design rows; ``est_all``: F^(all tasks))."""
    size = S.sum(1)
    e, t = est[ev], truth[ev]
    anchored = f_obs_all + est - est_all
    out = {
        "spearman": _spearman(e, t),
        "spearman_within_size": partial_spearman(e, t, size[ev]),
        "relative_error_median": float(np.median(np.abs(e - t) / np.abs(t))),
        "relative_error_anchored_median": float(np.median(np.abs(anchored[ev] - t) / np.abs(t))),
        "std_ratio": float(np.std(e) / np.std(t)) if np.std(t) > 0 else None,
        # the tuning half's ranking: what a choice (e.g. of k) may look at (the rest is the evaluation)
        "spearman_tuning_half": _spearman(est[fit], truth[fit]),
        "spearman_within_size_tuning_half": partial_spearman(est[fit], truth[fit], size[fit]),
    }
    try:
        out["kernelsm_heldout_lds"] = heldout_scores(KernelSurrogate(), S[fit], est[fit], S[ev], t)["lds"]
    except ValueError:
        out["kernelsm_heldout_lds"] = None
    return out


def noise_ceiling(F_seeds: np.ndarray, ev) -> dict:
    """Seed-to-seed Spearman of real F (pairs of batch seeds) and, by Spearman-Brown, the expected
    agreement of a perfect estimator with the mean of the R seeds."""
    R = F_seeds.shape[0]
    if R < 2:
        return None
    pairs = [_spearman(F_seeds[i, ev], F_seeds[j, ev]) for i in range(R) for j in range(i + 1, R)]
    rho = float(np.mean(pairs))
    mean_rel = R * rho / (1 + (R - 1) * rho) if rho > 0 else 0.0
    return {"seed_to_seed_spearman": rho, "pairs": pairs, "ceiling_vs_single_seed": math.sqrt(max(rho, 0)),
            "ceiling_vs_seed_mean": math.sqrt(max(mean_rel, 0)), "n_batch_seeds": R}


# -- features --------------------------------------------------------------------------------------
def _save_feats(path, f: HarvestedFeatures):
    tmp = path + ".tmp.npz"  # atomic: a killed run leaves no half-written cache
    _savez(tmp, f)
    os.replace(tmp, path)


def _savez(path, f: HarvestedFeatures):
    np.savez(path, outputs=f.outputs, jacobians=f.jacobians, labels=f.labels, task_ids=f.task_ids,
             task_names=np.array([str(t) for t in f.task_names]), mode=np.array(f.mode))


def _load_feats(path) -> HarvestedFeatures:
    z = np.load(path)
    return HarvestedFeatures(outputs=z["outputs"], jacobians=z["jacobians"], labels=z["labels"],
                             task_ids=z["task_ids"], task_names=[str(t) for t in z["task_names"]], mode=str(z["mode"]))


def preconditioner_scale(exp_avg_sq: dict, steps: int, beta2: float, eps: float) -> dict:
    """Per-parameter factor ``1 / sqrt(sqrt(v_hat) + eps)`` from the run's Adam second moments."""
    c2 = 1 - beta2 ** max(steps, 1)
    return {n: 1.0 / torch.sqrt(torch.sqrt(v / c2) + eps) for n, v in exp_avg_sq.items()}


def harvest_cached(path, model, batches_fn, *, projection, k, seed, mode, scale=None, task_names=None):
    """Harvest (or load) features; ``scale``: per-parameter gradient factors applied before the
    projection (the preconditioned harvest)."""
    if os.path.exists(path):
        return _load_feats(path), json.load(open(path + ".json"))["seconds"]
    proj = projector_for_model(model, projection, k, seed)
    if scale is not None:
        proj = preconditioned_projector(proj, scale)
    start = time.perf_counter()
    feats = harvest(model, batches_fn(), projector=proj, mode=mode, task_names=task_names, chunk_size=128)
    seconds = time.perf_counter() - start
    _save_feats(path, feats)
    json.dump({"seconds": seconds}, open(path + ".json", "w"))
    return feats, seconds


def readout_cached(path, model, source_batches, target_batches, scale):
    """The exact target readout of the source samples (preconditioned by ``scale``), cached."""
    if os.path.exists(path):
        z = np.load(path)
        return z["readout"], [str(c) for c in z["columns"]], float(z["seconds"])
    t = time.perf_counter()
    r, cols = exact_readout(model, source_batches, target_batches, mode="margin", scale=scale)
    seconds = time.perf_counter() - t
    np.savez(path + ".tmp.npz", readout=r, columns=np.array(cols), seconds=seconds)
    os.replace(path + ".tmp.npz", path)
    return r, cols, seconds


def stacked(draws: list) -> HarvestedFeatures:
    """Features of several projection draws side by side, as the callback stores them (proj_draws)."""
    if len(draws) == 1:
        return draws[0]
    jac = np.concatenate([np.asarray(f.jacobians) for f in draws], axis=-1)
    return dataclasses.replace(draws[0], jacobians=jac, projection_draws=len(draws))


def with_readout(feats: HarvestedFeatures, readout, columns) -> HarvestedFeatures:
    """Preconditioned source features as the callback stores them: with the exact readout."""
    return dataclasses.replace(feats, readout=readout, readout_columns=list(columns), preconditioned=True)


def _order(feats: HarvestedFeatures, names: list) -> np.ndarray:
    return np.array([names.index(str(n)) for n in feats.task_names])


# -- oracle: the real weight change through the first-order model ----------------------------------
def modular_oracle(model, w0, data, dw_dir, S, target_feats: dict, projectors: dict) -> dict:
    """Test loss of f0 + J dW_s with the real dW_s of each retrained subset (first batch seed):
    exact Jacobians (logits and margin, by a JVP) and through projected target features."""
    from torch.func import functional_call, jvp

    params = {n: w0[n] for n, _ in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    x, y = data.tokens[data.test], data.labels[data.test]

    def logits(p):
        return functional_call(model, (p, buffers), (x,))

    out = {"exact_logits": [], "exact_margin": []}
    out.update({name: [] for name in projectors})
    with torch.no_grad():
        z0 = logits(params)
    for s in S:
        dw = torch.load(os.path.join(dw_dir, subset_key(s) + ".pt"), weights_only=True)
        _, dz = jvp(logits, (params,), ({n: dw[n] for n in params},))
        z1 = (z0 + dz).double()
        out["exact_logits"].append(float(torch.nn.functional.cross_entropy(z1, y)))
        # margin: m = z_y - logsumexp_{j != y} z_j, linearized: m0 + <grad m, dz>
        mask = torch.nn.functional.one_hot(y, z0.shape[1]).bool()
        others = z0.double().masked_fill(mask, float("-inf"))
        p_other = torch.softmax(others, 1)
        m0 = z0.double().gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)
        dm = dz.double().gather(1, y[:, None])[:, 0] - (p_other * dz.double().masked_fill(mask, 0)).sum(1)
        out["exact_margin"].append(float(torch.nn.functional.softplus(-(m0 + dm)).mean()))
        for name, (proj, scale_back) in projectors.items():
            tf = target_feats[name]
            g = {n: (dw[n] if scale_back is None else dw[n] / scale_back[n])[None] for n in proj.names}
            zk = proj.project(g)[0].double().numpy()
            m = tf.outputs.astype(np.float64) + tf.jacobians.astype(np.float64) @ zk
            out[name].append(float(np.mean(np.logaddexp(0.0, -m))))
    return {k: np.array(v) for k, v in out.items()}


# -- estimator rows --------------------------------------------------------------------------------
def _with_all(S):
    return np.vstack([S, np.ones((1, S.shape[1]), dtype=bool)])


def _cached(path, compute):
    """``compute() -> (estimates, seconds[, info])``, kept in ``path`` (JSON) so a rerun only scores."""
    if os.path.exists(path):
        d = json.load(open(path))
        return (np.array(d["estimates"]), d["seconds"]) + ((d["info"],) if d.get("info") else ())
    out = compute()
    json.dump({"estimates": np.asarray(out[0]).tolist(), "seconds": out[1],
               "info": out[2] if len(out) > 2 else None}, open(path, "w"))
    return out


class _Rows(dict):
    """Estimator rows whose values are computed once and cached under ``directory``."""

    only = None  # --only-rows: the names computed (None: all)

    def __init__(self, directory):
        super().__init__()
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def __setitem__(self, name, value):
        super().__setitem__(name, value)

    def lazy(self, name, compute):
        if self.only is not None and name not in self.only:
            return
        self[name] = _cached(os.path.join(self.directory, name + ".json"), compute)


def _timed_plus(fn, extra_seconds):
    t = time.perf_counter()
    v = fn()
    return v, time.perf_counter() - t + extra_seconds


def self_checked_row(src, tgt, SA, run, extra_seconds: float = 0.0):
    """What the report uses: the self-check's choice of estimator (issue #26), then its estimate."""
    from lightning_ksm.estimation.selfcheck import self_check

    t0 = time.perf_counter()
    chosen_cfg, record = self_check(src, tgt, AnalysisConfig(), run)
    est = estimate_subsets(src, tgt, SA, chosen_cfg, run=run).column("all")
    info = {"chosen": None, "grade": None} if record is None else {
        "chosen": record["chosen"], "grade": record["grade"],
        "candidates": {n: {"grade": c.get("grade"), "worst_ratio": c.get("worst_ratio")}
                       for n, c in record["candidates"].items()}}
    return est, time.perf_counter() - t0 + extra_seconds, info


def run_estimators(S, src_draws, tgt_draws, pre_src, pre_tgt, run, cols, cfg_lam, fit, truth, cache_dir,
                   readout=None, callback_default=None):
    """Every estimator's F^ on the design rows (+ the all-tasks row last); returns {name: (F^, s)}."""
    SA = _with_all(S)[:, cols]
    rows = _Rows(cache_dir)

    def timed(fn):
        return lambda: _timed(fn)

    def _timed(fn):
        t = time.perf_counter()
        v = fn()
        return v, time.perf_counter() - t

    def col(res):
        return res.column("all")

    rows.lazy("proximal", timed(lambda: col(gradex(src_draws[0], tgt_draws[0], SA, lam=cfg_lam,
                                                   weighting="sample"))))
    rows.lazy("proximal_draws", timed(lambda: np.mean(
        [col(gradex(s, t, SA, lam=cfg_lam, weighting="sample")) for s, t in zip(src_draws, tgt_draws)], 0)))
    rows.lazy("simulate_adam", timed(lambda: col(simulate(src_draws[0], tgt_draws[0], SA, run))))
    rows.lazy("simulate_adam_draws", timed(lambda: np.mean(
        [col(simulate(s, t, SA, run)) for s, t in zip(src_draws, tgt_draws)], 0)))
    rows.lazy("simulate_adam_calibrated", timed(lambda: col(simulate(src_draws[0], tgt_draws[0], SA, run,
                                                                     calibrate="loss"))))
    if pre_src:
        rows.lazy("simulate_precond", timed(lambda: col(simulate(pre_src[0], pre_tgt[0], SA, run,
                                                                 adam_as="preconditioned"))))
        rows.lazy("simulate_precond_draws", timed(lambda: np.mean(
            [col(simulate(s, t, SA, run, adam_as="preconditioned")) for s, t in zip(pre_src, pre_tgt)], 0)))
        rows.lazy("simulate_precond_calibrated", timed(lambda: col(simulate(
            pre_src[0], pre_tgt[0], SA, run, adam_as="preconditioned", calibrate="loss"))))

        def tuned():  # the one tuned constant: a learning-rate factor, chosen on the tuning half only
            best, best_r, best_est = 1.0, -2.0, None
            t0 = time.perf_counter()
            for c in LR_GRID:
                est = col(simulate(pre_src[0], pre_tgt[0], SA, run, adam_as="preconditioned", lr_scale=c))
                r = _spearman(est[:-1][fit], truth[fit])
                if r > best_r:
                    best, best_r, best_est = c, r, est
            return best_est, time.perf_counter() - t0, {"lr_scale": best, "tuned_on": "tuning half",
                                                        "tuning_spearman": best_r}
        rows.lazy("simulate_precond_tuned", tuned)
    if readout is not None:  # the exact target readout on the preconditioned features (issue #10)
        r_src = [with_readout(f, *readout) for f in pre_src]
        r_tgt = [dataclasses.replace(f, preconditioned=True) for f in pre_tgt]
        rows.lazy("simulate_readout", timed(lambda: col(simulate(r_src[0], r_tgt[0], SA, run))))
        rows.lazy("simulate_readout_effect", timed(lambda: col(simulate(r_src[0], r_tgt[0], SA, run,
                                                                        calibrate="effect"))))
        for name, kw in _RUN_BATCH_ROWS.items():  # the run's minibatches (issue #25 item 1)
            rows.lazy(name, timed(lambda kw=kw: col(simulate(r_src[0], r_tgt[0], SA, run, calibrate="effect", **kw))))
        rows.lazy("simulate_readout_draws", timed(lambda: np.mean(
            [col(simulate(s, t, SA, run, calibrate="effect")) for s, t in zip(r_src, r_tgt)], 0)))
    cfg = AnalysisConfig()
    if callback_default is not None:  # the callback's defaults: its k, its features, AnalysisConfig()
        rows.lazy("default", timed(lambda: col(estimate_subsets(*callback_default, SA, cfg, run=run))))
        rows.lazy("default_selfcheck", lambda: self_checked_row(*callback_default, SA, run))
        for name, (kind, orders) in _DEFAULT_BATCH_ROWS.items():
            rows.lazy(name, timed(lambda kind=kind, orders=orders: col(estimate_subsets(
                *callback_default, SA, replace(cfg, simulate_batches=kind, simulate_batch_orders=orders), run=run))))
    return rows


def _score_rows(S, rows, truth, f_obs_all, fit, ev, harvest_seconds, extra=None):
    out = {}
    size = S.sum(1).astype(float)
    out["minus_size"] = score(S, -size, -float(S.shape[1]), truth, f_obs_all, fit, ev)
    out["minus_size"]["note"] = "trivial baseline: F^ = -|s| (more tasks = lower loss); errors meaningless"
    for name, item in rows.items():
        est, seconds = item[0], item[1]
        sc = score(S, est[:-1], est[-1], truth, f_obs_all, fit, ev)
        sc["seconds"] = seconds
        sc["seconds_with_harvest"] = seconds + harvest_seconds
        if len(item) > 2:
            sc.update(item[2])
        out[name] = sc
    for name, est in (extra or {}).items():
        out[name] = score(S, est, np.nan, truth, f_obs_all, fit, ev)
        out[name].pop("relative_error_anchored_median")
    return out


# -- the modular problem ---------------------------------------------------------------------------
def modular_run_record(cfg, n_train, obs) -> dict:
    """What the callback records for the recipe's watched run (AdamW, 60 steps, step-based)."""
    return {"optimizer": {"type": "AdamW", "lr": cfg.finetune_lr, "betas": [0.9, 0.98], "eps": 1e-8,
                          "weight_decay": cfg.finetune_weight_decay},
            "steps": cfg.finetune_steps, "epoch_based": False, "max_steps": cfg.finetune_steps,
            "batch_size": cfg.finetune_batch, "accumulate_grad_batches": 1, "n_train_samples": n_train,
            "final_loss": obs["losses"]["all"], "final_losses": {"all": obs["losses"]["all"]},
            "displacement": obs["displacement"], "lr_schedule": None}


def modular_batches(data):
    """``batches(split)``: a factory of the modular problem's ``(tokens, labels, groups)`` batches of
    the source (train) or target (test) split."""
    names = data.group_names

    def batches(split):
        pos = data.train if split == "source" else data.test

        def gen():
            for b in range(0, len(pos), 512):
                idx = pos[b:b + 512]
                yield data.tokens[idx], data.labels[idx], [names[int(g)] for g in data.groups[idx]]
        return gen
    return batches


def modular_one(cfg, op, seed, args, log):
    spec = {}
    for item in args.batch_seeds:  # "N" (every op) or "op:N", one per W0 seed (the last repeats)
        spec.setdefault(item.split(":")[0] if ":" in item else None, []).append(int(item.split(":")[-1]))
    per = spec.get(op) or spec.get(None) or [1]
    n_bs = per[min(seed, len(per) - 1)]
    tr = modular_truth(cfg, op, seed, n_bs, os.path.join(ROOT, "modular"), log=log)
    data, w0, S, obs = tr["data"], tr["w0"], tr["subsets"], tr["observed"]
    F_seeds = np.stack([r.column("all") for r in tr["reals"]])
    truth = F_seeds.mean(0)
    m = len(S)
    fit, ev = np.arange(m // 2), np.arange(m // 2, m)
    model = ma.new_model(cfg, 0)
    model.load_state_dict(w0)
    names = data.group_names
    batches = modular_batches(data)
    fdir = os.path.join(tr["run_dir"], "features")
    os.makedirs(fdir, exist_ok=True)
    k = cfg.proj_dim
    src, tgt, pre_src, pre_tgt, hsec, psec = [], [], [], [], 0.0, 0.0
    scale = preconditioner_scale(obs["exp_avg_sq"], obs["steps"], 0.98, 1e-8)
    for d in range(args.draws):
        for split, lst in (("source", src), ("target", tgt)):
            f, s = harvest_cached(os.path.join(fdir, f"{split}-sjlt{k}-d{d}.npz"), model, batches(split),
                                  projection="sjlt", k=k, seed=d, mode="margin", task_names=names)
            lst.append(f)
            hsec += s if d == 0 else 0.0
        for split, lst in (("source", pre_src), ("target", pre_tgt)):
            f, s = harvest_cached(os.path.join(fdir, f"{split}-sjlt{k}-pre-d{d}.npz"), model, batches(split),
                                  projection="sjlt", k=k, seed=d, mode="margin", scale=scale, task_names=names)
            lst.append(f)
            psec += s if d == 0 else 0.0
    def plain(split):
        return [(x, y, g) for x, y, g in batches(split)()]
    r, rcols, rsec = readout_cached(os.path.join(fdir, "readout-pre.npz"), model, plain("source"), plain("target"),
                                    scale)
    k0, n0 = HarvestConfig().proj_dim, HarvestConfig().proj_draws  # what the callback harvests by default
    cb, dsec = {"source": [], "target": []}, 0.0
    for d in range(n0):
        for split in ("source", "target"):
            f, s_ = harvest_cached(os.path.join(fdir, f"{split}-sjlt{k0}-pre-d{d}.npz"), model, batches(split),
                                   projection="sjlt", k=k0, seed=d, mode="margin", scale=scale, task_names=names)
            cb[split].append(f)
            dsec += s_
    callback_default = (with_readout(stacked(cb["source"]), r, rcols),
                        dataclasses.replace(stacked(cb["target"]), preconditioned=True))
    larger = {}
    for kk in (args.readout_k if seed == 0 else []):  # the same estimator at other projection sizes
        pair = [harvest_cached(os.path.join(fdir, f"{split}-sjlt{kk}-pre-d0.npz"), model, batches(split),
                               projection="sjlt", k=kk, seed=0, mode="margin", scale=scale, task_names=names)
                for split in ("source", "target")]
        larger[kk] = ((with_readout(pair[0][0], r, rcols), dataclasses.replace(pair[1][0], preconditioned=True)),
                      pair[0][1] + pair[1][1] + rsec)
    factorized = {}
    for kf in (args.readout_factorized_k if seed == 0 else []):  # the factorized harvest, k per parameter
        pair = [harvest_cached(os.path.join(fdir, f"{split}-factorized{kf}-pre-d0.npz"), model, batches(split),
                               projection="factorized", k=kf, seed=0, mode="margin", scale=scale,
                               task_names=names) for split in ("source", "target")]
        eff = projector_for_model(model, "factorized", kf, 0).preconditioned(scale).effective_scale()
        rf, rfcols, rfsec = readout_cached(os.path.join(fdir, f"readout-factorized{kf}-pre.npz"), model,
                                           plain("source"), plain("target"), eff)
        factorized[kf] = ((with_readout(pair[0][0], rf, rfcols), dataclasses.replace(pair[1][0], preconditioned=True)),
                          pair[0][1] + pair[1][1] + rfsec)
    log(f"[{op} seed {seed}] features ready (harvest {hsec:.0f}s, preconditioned {psec:.0f}s, readout {rsec:.0f}s)")
    cols = _order(src[0], names)
    run = modular_run_record(cfg, len(data.train), obs)
    rows = run_estimators(S, src, tgt, pre_src, pre_tgt, run, cols, cfg.lam, fit, truth,
                          os.path.join(tr["run_dir"], "estimates"), readout=(r, rcols),
                          callback_default=callback_default)
    for kf, (pair, fsec) in factorized.items():
        rows.lazy(f"factorized{kf}_readout", lambda pair=pair, fsec=fsec: _timed_plus(
            lambda: simulate(*pair, _with_all(S)[:, cols], run, calibrate="effect").column("all"), fsec))
    for kk, (pair, ksec) in larger.items():
        rows.lazy(f"simulate_readout_k{kk}", lambda pair=pair, ksec=ksec: _timed_plus(
            lambda: simulate(*pair, _with_all(S)[:, cols], run, calibrate="effect").column("all"), ksec))
    # oracle rows: the real dW through the first-order model (exact, and projected targets)
    projectors, tfeats = {}, {}
    for kk in args.oracle_k:
        name = f"oracle_sjlt{kk}_margin"
        tfeats[name], _ = harvest_cached(os.path.join(fdir, f"target-sjlt{kk}-d0.npz"), model, batches("target"),
                                         projection="sjlt", k=kk, seed=0, mode="margin", task_names=names)
        projectors[name] = (projector_for_model(model, "sjlt", kk, 0), None)
    for kk in args.oracle_factorized_k:  # the factorized projection (budget kk per parameter)
        name = f"oracle_factorized{kk}_margin"
        tfeats[name], _ = harvest_cached(os.path.join(fdir, f"target-factorized{kk}-d0.npz"), model,
                                         batches("target"), projection="factorized", k=kk, seed=0, mode="margin",
                                         task_names=names)
        projectors[name] = (projector_for_model(model, "factorized", kk, 0), None)
    pname = f"oracle_sjlt{k}_margin_preconditioned"
    tfeats[pname] = pre_tgt[0]
    projectors[pname] = (projector_for_model(model, "sjlt", k, 0), scale)
    t0 = time.perf_counter()
    if _Rows.only is not None and not any(n.startswith("oracle") for n in _Rows.only):
        projectors = None  # --only-rows without oracle rows
    oracle = {} if projectors is None else modular_oracle(model, w0, data, os.path.join(tr["run_dir"], "dw"), S, tfeats, projectors)
    log(f"[{op} seed {seed}] oracle rows {time.perf_counter() - t0:.0f}s")
    scores = _score_rows(S, rows, truth, obs["losses"]["all"], fit, ev, hsec,
                         extra={f"oracle_{k2}" if not k2.startswith("oracle") else k2: v for k2, v in oracle.items()})
    for name in ("simulate_precond", "simulate_precond_draws", "simulate_precond_calibrated", "simulate_precond_tuned"):
        if name in scores:
            scores[name]["seconds_with_harvest"] = scores[name]["seconds"] + psec
    for name in ("simulate_readout", "simulate_readout_effect", "simulate_readout_draws", *_RUN_BATCH_ROWS):
        if name in scores:
            scores[name]["seconds_with_harvest"] = scores[name]["seconds"] + psec + rsec
    for kk in larger:
        scores[f"simulate_readout_k{kk}"]["seconds_with_harvest"] = scores[f"simulate_readout_k{kk}"]["seconds"]
        scores[f"simulate_readout_k{kk}"]["features"] = f"sjlt k = {kk}, preconditioned, exact readout"
    for kf in factorized:  # its seconds already hold its own harvest and readout
        scores[f"factorized{kf}_readout"]["seconds_with_harvest"] = scores[f"factorized{kf}_readout"]["seconds"]
        scores[f"factorized{kf}_readout"]["features"] = (f"factorized k = {kf} per parameter "
                                                          f"({factorized[kf][0][0].proj_dim} dims), preconditioned "
                                                          "(rank one per matrix), exact readout")
    for name in ("default", *_DEFAULT_BATCH_ROWS):
        if name not in scores:
            continue
        scores[name]["seconds_with_harvest"] = scores[name]["seconds"] + dsec + rsec
        scores[name]["features"] = (f"the callback's defaults: sjlt k = {k0} x {n0} draws, preconditioned, "
                                         "exact readout")
    retrain_s = float(np.sum(tr["reals"][0].seconds))
    surrogate_on_real = None
    if len(F_seeds) > 1:  # a surrogate fitted on real runs: scored on the same batch stream, and on another
        from lightning_ksm.surrogates import LinearSurrogate
        surrogate_on_real = {
            "linear_fit_seed0_scored_seed0": heldout_scores(LinearSurrogate(), S[fit], F_seeds[0][fit], S[ev], F_seeds[0][ev])["lds"],
            "linear_fit_seed0_scored_seed1": heldout_scores(LinearSurrogate(), S[fit], F_seeds[0][fit], S[ev], F_seeds[1][ev])["lds"],
            "kernel_fit_seed0_scored_seed1": heldout_scores(KernelSurrogate(), S[fit], F_seeds[0][fit], S[ev], F_seeds[1][ev])["lds"],
        }
    res = {
        "surrogate_on_real_retraining": surrogate_on_real,
        "op": op, "seed": seed, "n_subsets": m, "n_tuning": len(fit), "n_evaluation": len(ev),
        "noise_ceiling": noise_ceiling(F_seeds, ev),
        "real_f": {"mean": float(truth.mean()), "std_eval": float(truth[ev].std()),
                   "seed_noise_std": float(np.std(F_seeds[0] - F_seeds[1]) / math.sqrt(2)) if len(F_seeds) > 1 else None},
        "observed_all_tasks": {"loss": obs["losses"]["all"], "displacement": obs["displacement"],
                               "seconds": obs["seconds"]},
        "seconds_real_retraining_one_seed": retrain_s, "seconds_harvest": hsec, "seconds_harvest_preconditioned": psec,
        "seconds_readout": rsec, "seconds_harvest_callback_default": dsec,
        "pretrain_seconds": tr["pretrain_seconds"], "run_record": run, "estimators": scores,
        "f_real_mean_seeds": truth.tolist(), "estimates": {n: np.asarray(v[0]).tolist() for n, v in rows.items()},
    }
    log(f"[{op} seed {seed}] " + ", ".join(f"{n} {v['spearman']:.2f}/{v['spearman_within_size']:.2f}"
                                           for n, v in scores.items()))
    return res


# -- the project-like problem ----------------------------------------------------------------------
def project_one(seed, args, log):
    from lightning_ksm.harvesting.projection import make_projector

    tr = project_truth(seed, 3, os.path.join(ROOT, "project"), log=log, n_random=args.project_subsets)
    prob, S = tr["problem"], tr["subsets"]
    F_seeds = np.stack([r.column("all") for r in tr["reals"]])
    truth = F_seeds.mean(0)
    K = S.shape[1]
    rand = np.arange(K + 1, len(S))
    fit, ev = rand[: len(rand) // 2], rand[len(rand) // 2:]
    model = prob.model()
    # the observed all-tasks run (batch seed of the first real seed), its Adam state
    t0 = time.perf_counter()
    m_all, opt, steps = prob.fit(np.ones(K, dtype=bool), 100 * seed)
    obs_seconds = time.perf_counter() - t0
    obs_loss = prob.target_loss(m_all)
    params = dict(m_all.named_parameters())
    v = {n: opt.state[p]["exp_avg_sq"] for n, p in params.items()}
    scale = preconditioner_scale(v, steps, 0.999, 1e-8)
    run = {"optimizer": {"type": "Adam", "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
           "steps": steps, "epochs": 5, "epoch_based": True, "batch_size": 64, "accumulate_grad_batches": 1,
           "final_loss": obs_loss, "final_losses": {"all": obs_loss, "target": obs_loss}, "lr_schedule": None}
    fdir = os.path.join(ROOT, "project", f"seed{seed}", "features")
    os.makedirs(fdir, exist_ok=True)
    names = prob.task_names

    def batches(split):
        return lambda: ((x, y, [names[t] for t in ts] if split == "source" else ["target"] * len(ts))
                        for x, y, ts in prob.batches(split))

    shapes = {n: p.shape for n, p in model.named_parameters()}
    feats = {}
    hsec = {}
    for kind, k, mode, sc in (("sjlt", 256, "margin", None), ("sjlt", 256, "margin", "pre")):
        key = f"{kind}{k or ''}-{mode}{'-pre' if sc else ''}"
        pair = []
        hsec[key] = 0.0
        for split in ("source", "target"):
            path = os.path.join(fdir, f"{split}-{key}.npz")
            if os.path.exists(path):
                f, s = _load_feats(path), json.load(open(path + ".json"))["seconds"]
            else:
                proj = make_projector(kind, shapes, k, 0)
                if sc:
                    proj = preconditioned_projector(proj, scale)
                t = time.perf_counter()
                f = harvest(model, batches(split)(), projector=proj, mode=mode, chunk_size=256,
                            task_names=names if split == "source" else None)
                s = time.perf_counter() - t
                _save_feats(path, f)
                json.dump({"seconds": s}, open(path + ".json", "w"))
            pair.append(f)
            hsec[key] += s
        feats[key] = pair
    SA = _with_all(S)
    rows = _Rows(os.path.join(ROOT, "project", f"seed{seed}", "estimates"))

    def add(name, fn, hkey):
        def compute():
            t = time.perf_counter()
            est = fn().column("all")
            return est, time.perf_counter() - t + hsec[hkey]
        rows.lazy(name, compute)

    add("proximal", lambda: gradex(*feats["sjlt256-margin"], SA, lam=1e-2, weighting="sample"), "sjlt256-margin")
    add("simulate_adam", lambda: simulate(*feats["sjlt256-margin"], SA, run), "sjlt256-margin")
    add("simulate_precond", lambda: simulate(*feats["sjlt256-margin-pre"], SA, run, adam_as="preconditioned"),
        "sjlt256-margin-pre")
    add("simulate_precond_calibrated",
        lambda: simulate(*feats["sjlt256-margin-pre"], SA, run, adam_as="preconditioned", calibrate="loss"),
        "sjlt256-margin-pre")
    r, rcols, rsec = readout_cached(
        os.path.join(fdir, "readout-pre.npz"), model, [(x, y, t) for x, y, t in batches("source")()],
        [(x, y, t) for x, y, t in batches("target")()], scale)
    hsec["readout"] = hsec["sjlt256-margin-pre"] + rsec
    r_src = with_readout(feats["sjlt256-margin-pre"][0], r, rcols)
    r_tgt = dataclasses.replace(feats["sjlt256-margin-pre"][1], preconditioned=True)
    add("simulate_readout", lambda: simulate(r_src, r_tgt, SA, run), "readout")
    add("simulate_readout_effect", lambda: simulate(r_src, r_tgt, SA, run, calibrate="effect"), "readout")
    for name, kw in _RUN_BATCH_ROWS.items():
        add(name, lambda kw=kw: simulate(r_src, r_tgt, SA, run, calibrate="effect", **kw), "readout")
    # the callback's defaults (its k and draws, preconditioned, exact readout, AnalysisConfig())
    k0, n0 = HarvestConfig().proj_dim, HarvestConfig().proj_draws
    cb = {"source": [], "target": []}
    hsec["callback"] = rsec
    for d in range(n0):
        for split in ("source", "target"):
            f, s_ = harvest_cached(os.path.join(fdir, f"{split}-sjlt{k0}-margin-pre-d{d}.npz"), model, batches(split),
                                   projection="sjlt", k=k0, seed=d, mode="margin", scale=scale,
                                   task_names=names if split == "source" else None)
            cb[split].append(f)
            hsec["callback"] += s_
    c_src = with_readout(stacked(cb["source"]), r, rcols)
    c_tgt = dataclasses.replace(stacked(cb["target"]), preconditioned=True)
    add("default", lambda: estimate_subsets(c_src, c_tgt, SA, AnalysisConfig(), run=run), "callback")
    rows.lazy("default_selfcheck", lambda: self_checked_row(c_src, c_tgt, SA, run, hsec["callback"]))
    for name, (kind, orders) in _DEFAULT_BATCH_ROWS.items():
        add(name, lambda kind=kind, orders=orders: estimate_subsets(c_src, c_tgt, SA, replace(
            AnalysisConfig(), simulate_batches=kind, simulate_batch_orders=orders), run=run), "callback")
    for kind in getattr(args, "project_extra_kinds", ()):  # the same estimator on other features of its size
        eff = projector_for_model(model, kind, k0, 0).with_scale(scale)
        eff = getattr(eff, "effective_scale", lambda: None)() or scale  # what the features applied
        rk, rkcols, rksec = readout_cached(
            os.path.join(fdir, f"readout-{kind}{k0}-pre.npz"), model, [(x, y, t) for x, y, t in batches("source")()],
            [(x, y, t) for x, y, t in batches("target")()], eff)
        other, hsec[kind] = {"source": [], "target": []}, rksec
        for d in range(n0):
            for split in ("source", "target"):
                f, s_ = harvest_cached(os.path.join(fdir, f"{split}-{kind}{k0}-margin-pre-d{d}.npz"), model,
                                       batches(split), projection=kind, k=k0, seed=d, mode="margin", scale=scale,
                                       task_names=names if split == "source" else None)
                other[split].append(f)
                hsec[kind] += s_
        pair = (with_readout(stacked(other["source"]), rk, rkcols),
                dataclasses.replace(stacked(other["target"]), preconditioned=True))
        add(f"default_{kind}", lambda pair=pair: estimate_subsets(*pair, SA, AnalysisConfig(), run=run), kind)
    scores = {}
    size = S.sum(1).astype(float)
    scores["minus_size"] = score(S, -size, -float(K), truth, obs_loss, fit, ev)
    loo = np.arange(1, K + 1)
    real_effect = truth[loo] - truth[0]  # F(without k) - F(all): > 0 means task k helps
    for name, item in rows.items():
        est, seconds = item[0], item[1]
        e = est[:-1]
        sc = score(S, e, est[-1], truth, obs_loss, fit, ev)
        sc["seconds_with_harvest"] = seconds
        if len(item) > 2:  # e.g. the self-check's choice
            sc.update(item[2])
        eff = e[loo] - e[0]
        sc["loo_spearman"] = _spearman(eff, real_effect)
        sc["harmful_effect_ratio"] = {names[t]: float(eff[t] / real_effect[t]) for t in HARMFUL}
        sc["helpful_effect_ratio"] = {names[t]: float(eff[t] / real_effect[t]) for t in HELPFUL}
        sc["loo_effects"] = eff.tolist()
        scores[name] = sc
    retrain_s = float(np.sum(tr["reals"][0].seconds))
    res = {"seed": seed, "n_subsets": len(S), "design": "all tasks, 10 leave-one-out, then random Bernoulli(0.8)",
           "n_tuning": len(fit), "n_evaluation": len(ev), "noise_ceiling": noise_ceiling(F_seeds, ev),
           "loo_noise_ceiling": noise_ceiling(F_seeds[:, loo] - F_seeds[:, :1], np.arange(K)),
           "real_loo_effects": real_effect.tolist(), "observed_all_tasks": {"loss": obs_loss, "seconds": obs_seconds},
           "seconds_real_retraining_one_seed": retrain_s, "seconds_harvest": hsec, "run_record": run,
           "estimators": scores}
    log(f"[project seed {seed}] " + ", ".join(f"{n} {v['spearman']:.2f}/{v.get('loo_spearman', 0):.2f}"
                                              for n, v in scores.items()))
    return res


# -- summary ---------------------------------------------------------------------------------------
_KEYS = ("spearman", "spearman_within_size", "spearman_tuning_half", "relative_error_median",
         "relative_error_anchored_median", "std_ratio", "kernelsm_heldout_lds", "seconds_with_harvest", "loo_spearman")


def summarize(runs: list) -> dict:
    out = {}
    names = []
    for r in runs:
        names += [n for n in r["estimators"] if n not in names]
    for name in names:
        row = {}
        for key in _KEYS:
            vals = [r["estimators"][name].get(key) for r in runs if name in r["estimators"]]
            vals = [v for v in vals if v is not None and np.isfinite(v)]
            if vals:
                row[key] = {"mean": float(np.mean(vals)), "values": vals}
        for key in ("harmful_effect_ratio", "helpful_effect_ratio"):  # project: per source, per seed
            per = [r["estimators"][name].get(key) for r in runs if name in r["estimators"]]
            per = [p for p in per if p]
            if per:
                row[key] = {"values": per, "geometric_mean": float(np.exp(np.mean(
                    [np.log(v) for p in per for v in p.values() if v > 0])))}
        out[name] = row
    measured = [r["noise_ceiling"] for r in runs if r["noise_ceiling"]]
    out["noise_ceiling"] = {k: float(np.mean([nc[k] for nc in measured])) for k in
                            ("seed_to_seed_spearman", "ceiling_vs_seed_mean")} if measured else None
    out["noise_ceiling_measured_on"] = [r.get("seed") for r in runs if r["noise_ceiling"]]
    out["seconds_real_retraining_one_seed"] = float(np.mean([r["seconds_real_retraining_one_seed"] for r in runs]))
    return out


def format_tables(results: dict) -> str:
    lines = []
    for prob, title in (("modular_add", "Modular addition"), ("modular_quad", "Modular quadratic"),
                        ("project", "Project-like (10 sources, epoch-based Adam)")):
        summ = results["summary"].get(prob)
        if not summ:
            continue
        nc = summ["noise_ceiling"] or {"seed_to_seed_spearman": float("nan"), "ceiling_vs_seed_mean": float("nan")}
        lines += [f"**{title}** (noise ceiling, W0 seeds {summ['noise_ceiling_measured_on']}: seed-to-seed Spearman "
                  f"{nc['seed_to_seed_spearman']:.2f}, "
                  f"a perfect estimator vs the seed mean ~{nc['ceiling_vs_seed_mean']:.2f}; real retraining of the "
                  f"design, one seed: {summ['seconds_real_retraining_one_seed']:.0f} s)", "",
                  "| estimator | Spearman | within size | tuning half | rel. err. | anchored | std ratio | KernelSM LDS | seconds (incl. harvest) |"
                  + (" LOO Spearman | harmful effect, est./real | helpful effect, est./real |" if prob == "project" else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if prob == "project" else "")]

        def cell(row, key, pct=False):
            v = row.get(key)
            if v is None:
                return "–"
            return f"{100 * v['mean']:.1f} %" if pct else f"{v['mean']:.2f}"
        for name, row in summ.items():
            if not isinstance(row, dict) or "spearman" not in row:
                continue
            bold = "**" if name == "default" else ""
            def ratios(key):
                per = (row.get(key) or {}).get("values")
                if not per:
                    return "–"
                return " ; ".join("/".join(f"{v:.2f}" for v in p.values()) for p in per)
            extra = (f" {cell(row, 'loo_spearman')} | {ratios('harmful_effect_ratio')} | {ratios('helpful_effect_ratio')} |"
                     if prob == "project" else "")
            lines.append(f"| {bold}{name}{bold} | {cell(row, 'spearman')} | {cell(row, 'spearman_within_size')} | "
                         f"{cell(row, 'spearman_tuning_half')} | "
                         f"{cell(row, 'relative_error_median', True)} | {cell(row, 'relative_error_anchored_median', True)} | "
                         f"{cell(row, 'std_ratio')} | {cell(row, 'kernelsm_heldout_lds')} | "
                         f"{cell(row, 'seconds_with_harvest')} |" + extra)
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="W0 seeds per operation")
    ap.add_argument("--subsets", type=int, default=40, help="really retrained subsets per operation and seed")
    ap.add_argument("--batch-seeds", nargs="+", default=["2"],
                    help="real retrainings of every subset (batch seeds), 'N' or 'op:N', per W0 seed")
    ap.add_argument("--draws", type=int, default=2, help="projection draws averaged in the *_draws rows")
    ap.add_argument("--oracle-k", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--oracle-factorized-k", type=int, nargs="*", default=[256, 1024],
                    help="per-parameter budgets of the factorized projection in the oracle rows")
    ap.add_argument("--project-subsets", type=int, default=60)
    ap.add_argument("--project-seeds", type=int, default=2, help="seeds of the project-like problem")
    ap.add_argument("--readout-k", type=int, nargs="*", default=[2048, 4096],
                    help="other SJLT sizes of the preconditioned harvest with the exact readout (W0 seed 0 only)")
    ap.add_argument("--readout-factorized-k", type=int, nargs="*", default=[256],
                    help="per-parameter budgets of preconditioned factorized harvests with the exact readout "
                         "(W0 seed 0 only)")
    ap.add_argument("--ops", nargs="+", default=["add", "quad"])
    ap.add_argument("--tables", metavar="RESULTS_JSON")
    ap.add_argument("--only-rows", nargs="*", default=None,
                    help="compute only these estimator rows (and no oracle rows unless named): a lean rerun")
    ap.add_argument("--out", default="gradex_fidelity", help="results file name under benchmarks/results/")
    args = ap.parse_args(argv)
    _Rows.only = None if args.only_rows is None else set(args.only_rows)
    if args.tables:
        print(format_tables(json.load(open(args.tables))))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    cfg = replace(ma.FULL, n_subsets=args.subsets)
    runs = {"project": [project_one(seed, args, log) for seed in range(args.project_seeds)]}
    for seed in range(args.seeds):
        for op in args.ops:
            runs.setdefault(f"modular_{op}", []).append(modular_one(cfg, op, seed, args, log))
    results = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gradex_fidelity.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "design": {
            "modular": {"ops": args.ops, "w0_seeds": list(range(args.seeds)), "subsets_per_seed": args.subsets,
                        "batch_seeds_per_subset_per_w0_seed": args.batch_seeds, "ratio": cfg.subset_p,
                        "tuning": "first half of the subsets", "evaluation": "second half",
                        "recipe": asdict(cfg)},
            "project": {"subsets": "all + 10 leave-one-out + %d random (p = 0.8)" % args.project_subsets,
                        "batch_seeds_per_subset": 3, "tuning": "first half of the random subsets",
                        "evaluation": "second half of the random subsets; LOO scored on the 10 LOO subsets"},
            "tuned": "only the *_tuned rows: a learning-rate factor from %s, on the tuning half" % (LR_GRID,),
            "shortfall": ("the issue asks for >= 2 W0 seeds and >= 100 subsets per operation: met (2 x 100, the first "
                          "50 tune, the last 50 evaluate); every subset is retrained with 2 batch seeds (the issue's "
                          "remark on a 3-seed mean is not met: the ceilings are for the 2-seed mean). A Spearman "
                          "over 50 subsets has a standard error of about 0.1-0.14; means over 2 W0 seeds"),
            "default_choice": ("the callback's default (proj_dim 1024 x 2 projection draws, preconditioned harvest, exact "
                               "target readout, effect calibration) was chosen by the tuning-half Spearman of W0 seed 0 "
                               "(add and quad) and by the project's seed 0; W0 seed 1 of both operations was not looked "
                               "at before the choice; the project's seed 1 was seen after the readout and the "
                               "calibration were chosen, before the draws were (chosen on the modular tuning halves)"),
        },
        "lean_rerun": None if args.only_rows is None else {
            "rows": sorted(args.only_rows),
            "note": (f"a lean run (--only-rows): only these rows, no oracle rows; modular W0 seeds "
                     f"{list(range(args.seeds))}, {args.subsets} subsets (the first half tunes, the second "
                     f"evaluates), batch seeds {args.batch_seeds}, projection draws {args.draws}; the design's "
                     "'shortfall' text describes the full run, not this one")},
        "summary": {key: summarize(rs) for key, rs in runs.items()},
        "runs": runs,
        "total_wall_seconds_this_invocation": time.perf_counter() - start,
    }
    write_results(args.out, results)
    print(format_tables(results))


if __name__ == "__main__":
    main()
