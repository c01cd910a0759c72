"""The problems of benchmarks/peers.py, each with its real-retraining ground truth.

A :class:`Problem` holds everything every method needs: the retrained design (subsets ``S``, the real
target loss per batch seed ``F_seeds``, the tuning / evaluation / leave-one-out rows), the model at
the end of the watched all-tasks run (``final``), the watched run's training loop (``train_loop``,
replicated here so TracIn gets its checkpoints and TAG its lookahead), the per-sample data
(``x``, ``y``, ``task``; ``x_target``, ``y_target``), the harvested GradEx features and run record
(``features``, ``run``) for the project's own estimator.

- ``project``: benchmarks/_fidelity_project.py (10 sources, planted harmful 0, 1 and helpful 2, 3),
  ground truth cached by benchmarks/gradex_fidelity.py: all tasks, 10 leave-one-out, 60 random
  subsets, 3 batch seeds each.
- ``modular_add`` / ``modular_quad``: recipes/modular_arithmetic.py (FULL), W0 seed 0, 100 subsets
  (50 tuning, 50 evaluation), 2 batch seeds each, cached by the same harness.

GradEx's features (``Problem.features``) are the ones the callback harvests by default
(``HarvestConfig().proj_dim`` x ``proj_draws`` SJLT margin features, preconditioned, with the exact
target readout), cached by the fidelity harness (``_callback_features``), and ``Problem.run`` the watched run's record with its observed
all-tasks loss (``final_losses``: the effect calibration of ``AnalysisConfig()``).
- ``breast_cancer``: the Figure-1 logistic regression (recipes/breast_cancer_loo.py) made a task
  problem here: the 455 training points grouped into K = 10 tasks by k-means (seed 0) on the
  standardized features, the target the mean log-loss of the 114 test points; every subset is
  really refitted (exact Newton solve, deterministic: no seed noise), computed here (milliseconds
  per fit).

The cached problems are never retrained: :func:`_require_cached` checks every record is on disk
before the ground-truth loaders run.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["Problem", "load_problem", "PROBLEMS", "tiny_problem"]

FIDELITY = os.path.join("runs", "gradex_fidelity")
PROBLEMS = ("project", "breast_cancer", "modular_add", "modular_quad")


@dataclass
class Problem:
    name: str
    task_names: list
    S: np.ndarray                      # (m, K) retrained subsets
    F_seeds: np.ndarray                # (R, m) real target loss per batch seed
    fit: np.ndarray                    # tuning rows
    ev: np.ndarray                     # evaluation rows
    full: Optional[int]                # row of the all-tasks subset (None: not retrained)
    loo: Optional[np.ndarray]          # rows of the K leave-one-out subsets, task order
    model: nn.Module                   # architecture (loaded with ``final``)
    final: dict                        # state dict at the end of the watched all-tasks run
    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor                 # task index of each training sample
    x_target: torch.Tensor
    y_target: torch.Tensor
    train_loop: Optional[Callable] = None   # train_loop(hook) replicates the watched run, see below
    features: Optional[tuple] = None   # (source, target) HarvestedFeatures at W0
    run: Optional[dict] = None         # the watched run's record (None: GradEx's proximal solve)
    loss_kind: str = "ce"              # "ce" (multi-class logits) or "bce" (one logit)
    w0: Optional[dict] = None          # state dict at the start of the watched run
    retrain_seconds: float = float("nan")  # mean seconds of one real retraining (one subset, one seed)
    notes: dict = field(default_factory=dict)

    @property
    def truth(self) -> np.ndarray:
        return self.F_seeds.mean(0)

    @property
    def K(self) -> int:
        return self.S.shape[1]


def _require_cached(directory: str, n: int) -> None:
    have = len(glob.glob(os.path.join(directory, "subset-*.json")))
    if have < n:
        raise FileNotFoundError(
            f"{directory} holds {have} of {n} real retrainings: benchmarks/peers.py never retrains the "
            "cached problems; run benchmarks/gradex_fidelity.py first")


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _callback_features(fdir, keys, w0_model, source_batches, target_batches, exp_avg_sq, steps, beta2, own_dir):
    """The features the callback harvests by default, from the fidelity harness's cache: the
    preconditioned source features ``source-<key>.npz`` of each projection draw (``keys``: one per
    draw, stacked side by side as the callback stores them: ``gradex_fidelity.stacked``) with the
    exact target readout (``readout-pre.npz``; computed here into ``own_dir`` when the harness has
    not cached it: the harness's own ``readout_cached``, same inputs), the preconditioned target
    features. Returns ``(features, note)``."""
    from gradex_fidelity import _load_feats, preconditioner_scale, readout_cached, stacked, with_readout

    src = stacked([_load_feats(os.path.join(fdir, f"source-{k}.npz")) for k in keys])
    tgt = stacked([_load_feats(os.path.join(fdir, f"target-{k}.npz")) for k in keys])
    path = os.path.join(fdir, "readout-pre.npz")
    where = "the fidelity harness's cache"
    if not os.path.exists(path):
        os.makedirs(own_dir, exist_ok=True)
        path = os.path.join(own_dir, "readout-pre.npz")
        where = f"computed here ({path}) with gradex_fidelity.readout_cached: the harness had not cached it"
    if os.path.exists(path):  # readout_cached only loads it
        r, cols, seconds = readout_cached(path, None, None, None, None)
    else:
        scale = preconditioner_scale(exp_avg_sq, steps, beta2, 1e-8)
        r, cols, seconds = readout_cached(path, w0_model(), source_batches(), target_batches(), scale)
    note = (f"the callback's defaults (HarvestConfig proj_dim x proj_draws): {' + '.join(keys)} features "
            f"(preconditioned by the watched run's Adam second moments; {len(keys)} projection draw(s) side by side, "
            f"GradEx averaging over them) with the exact target readout ({where}; {seconds:.0f} s), analysis "
            "AnalysisConfig() = simulate, calibrate='effect' on the observed all-tasks loss")
    return (with_readout(src, r, cols), replace(tgt, preconditioned=True)), note


def _default_keys(fdir, pattern):
    """The callback's default harvest (HarvestConfig().proj_dim, .proj_draws) as fidelity-cache keys,
    and whether every file is there."""
    from lightning_ksm.config import HarvestConfig

    h = HarvestConfig()
    keys = [pattern.format(k=h.proj_dim, d=d) for d in range(getattr(h, "proj_draws", 1))]
    have = all(os.path.exists(os.path.join(fdir, f"{s}-{k}.npz")) for k in keys for s in ("source", "target"))
    return keys, have and os.path.exists(os.path.join(fdir, "readout-pre.npz"))


# -- project ---------------------------------------------------------------------------------------
def _project() -> Problem:
    from _fidelity_project import EPOCHS, BATCH, LR, project_design, project_truth
    from gradex_fidelity import _load_feats

    root = os.path.join(FIDELITY, "project")
    S = project_design(0, 60)
    for r in range(3):
        _require_cached(os.path.join(root, "seed0", f"retrain-b{r}"), len(S))
    tr = project_truth(0, 3, root, log=lambda *_: None, n_random=60)
    prob, S = tr["problem"], tr["subsets"]
    F_seeds = np.stack([r.column("all") for r in tr["reals"]])
    K = S.shape[1]
    rand = np.arange(K + 1, len(S))

    def train_loop(hook=None):
        """prob.fit(all tasks, batch seed 0), step by step: ``hook(model, opt, idx, step)`` before
        each optimizer step (``idx``: the batch's sample positions)."""
        model = prob.model()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(99_000 + 0)
        idx_all = torch.arange(len(prob.x))
        step = 0
        model.train()
        for _ in range(EPOCHS):
            order = idx_all[torch.randperm(len(idx_all), generator=g)]
            for b in range(0, len(order), BATCH):
                idx = order[b:b + BATCH]
                if hook is not None:
                    hook(model, opt, idx, step)
                loss = nn.functional.cross_entropy(model(prob.x[idx]), prob.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        model.eval()
        return model, opt, step

    model, opt, steps = train_loop()
    obs_loss = prob.target_loss(model)
    fdir = os.path.join(root, "seed0", "features")
    keys, default = _default_keys(fdir, "sjlt{k}-margin-pre-d{d}")
    if not default:  # the callback-default harvest not cached yet: the previous default (k = 256, one draw)
        keys = ["sjlt256-margin-pre"]
    feats, feature_note = _callback_features(
        fdir, keys, lambda: prob.model(),
        lambda: [(x, y, [prob.task_names[t] for t in ts]) for x, y, ts in prob.batches("source")],
        lambda: [(x, y, ["target"] * len(ts)) for x, y, ts in prob.batches("target")],
        {n: opt.state[q]["exp_avg_sq"] for n, q in model.named_parameters()}, steps, 0.999,
        os.path.join("runs", "peers", "project"))
    run = {"optimizer": {"type": "Adam", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
           "steps": steps, "epochs": EPOCHS, "epoch_based": True, "batch_size": BATCH,
           "accumulate_grad_batches": 1, "final_loss": obs_loss,
           "final_losses": {"all": obs_loss, "target": obs_loss}, "lr_schedule": None}
    return Problem("project", prob.task_names, S, F_seeds, rand[: len(rand) // 2], rand[len(rand) // 2:], 0,
                   np.arange(1, K + 1), prob.model(), _state(model), prob.x, prob.y, prob.task,
                   prob.x_target, prob.y_target, train_loop, feats, run, w0=dict(prob.w0),
                   retrain_seconds=float(np.mean([r.seconds for r in tr["reals"]])),
                   notes={"design": "all tasks, 10 leave-one-out, 60 random Bernoulli(0.8); tuning = first 30 "
                                    "random, evaluation = last 30 random", "batch_seeds": [0, 1, 2],
                          "planted": {"harmful": [0, 1], "helpful": [2, 3]}, "gradex_features": feature_note,
                          "gradex_features_default": default, "gradex_features_keys": keys})


# -- modular arithmetic ----------------------------------------------------------------------------
def _modular(op: str) -> Problem:
    from _fidelity_truth import batch_seeds, modular_truth
    from gradex_fidelity import _load_feats, modular_run_record
    from recipes import modular_arithmetic as ma

    cfg = replace(ma.FULL, n_subsets=100)
    root = os.path.join(FIDELITY, "modular")
    run_dir = os.path.join(root, op, "seed0")
    S = ma.evaluation_subsets(cfg, 0)
    for bs in batch_seeds(0, 2):
        _require_cached(os.path.join(run_dir, f"retrain-b{bs}"), len(S))
    for f in ("w0.pt", "observed.pt"):
        if not os.path.exists(os.path.join(run_dir, f)):
            raise FileNotFoundError(f"{run_dir}/{f} missing: run benchmarks/gradex_fidelity.py first")
    tr = modular_truth(cfg, op, 0, 2, root, log=lambda *_: None)
    data, w0, S, obs = tr["data"], tr["w0"], tr["subsets"], tr["observed"]
    F_seeds = np.stack([r.column("all") for r in tr["reals"]])
    m = len(S)
    final = {k: v.clone() for k, v in w0.items()}
    for k, d in obs["dw"].items():
        final[k] = final[k] + d

    def train_loop(hook=None):
        """ma.finetune(all tasks, batch seed 0) step by step (AdamW, 60 steps, batch 256)."""
        model = ma.new_model(cfg, 0)
        model.load_state_dict(w0)
        opt = ma._optimizer(model, cfg.finetune_lr, cfg.finetune_weight_decay, cfg.finetune_optimizer)
        gen = torch.Generator().manual_seed(30_000 + 0)
        n, B, step = len(data.train), cfg.finetune_batch, 0
        model.train()
        while step < cfg.finetune_steps:
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, B):
                if step == cfg.finetune_steps:
                    break
                local = perm[start:start + B]
                if hook is not None:
                    hook(model, opt, local, step)
                idx = data.train[local]
                loss = nn.functional.cross_entropy(model(data.tokens[idx]), data.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        model.eval()
        return model, opt, step

    model = ma.new_model(cfg, 0)
    fdir = os.path.join(run_dir, "features")
    keys, default = _default_keys(fdir, "sjlt{k}-pre-d{d}")
    if default:
        feats, feature_note = _callback_features(fdir, keys, None, None, None, None, None, None, None)
    else:  # the harness has not (yet) cached the callback-default features: the old plain ones, said so
        keys = [f"sjlt{cfg.proj_dim}-d0"]
        feats = tuple(_load_feats(os.path.join(fdir, f"{s}-{keys[0]}.npz")) for s in ("source", "target"))
        feature_note = (f"NOT the callback's defaults: the fidelity harness had not cached them in {fdir}, so the "
                        f"plain sjlt{cfg.proj_dim} margin features (no preconditioning, no exact readout) with "
                        "AnalysisConfig()")
    tr_pos, te_pos = data.train, data.test
    return Problem(f"modular_{op}", list(data.group_names), S, F_seeds, np.arange(m // 2), np.arange(m // 2, m),
                   None, None, model, final, data.tokens[tr_pos], data.labels[tr_pos], data.groups[tr_pos],
                   data.tokens[te_pos], data.labels[te_pos], train_loop, feats,
                   modular_run_record(cfg, len(tr_pos), obs), w0=w0,
                   retrain_seconds=float(np.mean([r.seconds for r in tr["reals"]])),
                   notes={"design": f"{m} Bernoulli(0.9) subsets of 25 tasks; tuning = first {m // 2}, evaluation = "
                                    f"last {m - m // 2}", "batch_seeds": batch_seeds(0, 2), "w0_seed": 0,
                          "gradex_features": feature_note, "gradex_features_default": default,
                          "gradex_features_keys": keys})


# -- breast cancer ---------------------------------------------------------------------------------
def _breast_cancer(n_random: int = 200, K: int = 10, p: float = 0.8) -> Problem:
    from sklearn.cluster import KMeans

    from lightning_ksm.features import HarvestedFeatures
    from recipes import breast_cancer_loo as bc

    cfg = bc.LOOConfig()
    X, y, Xt, yt, _ = bc.load_data(cfg)
    task = KMeans(K, n_init=10, random_state=0).fit_predict(X)
    n = len(X)

    def F(subset):
        keep = np.asarray(subset, dtype=bool)[task]
        w = bc.fit(X[keep], y[keep], cfg, n)
        return float(bc.point_losses(w, Xt, yt).mean()), w

    full = np.ones((1, K), dtype=bool)
    loo = ~np.eye(K, dtype=bool)
    seen = {r.tobytes() for r in np.vstack([full, loo])}
    rand = []
    for r in np.random.default_rng(73_000).random((50 * n_random, K)) < p:
        keep = r[task]
        if r.tobytes() not in seen and r.sum() >= 1 and 0 < y[keep].sum() < keep.sum():
            rand.append(r)
            seen.add(r.tobytes())
        if len(rand) == n_random:
            break
    S = np.vstack([full, loo, np.array(rand, dtype=bool)])
    t0 = time.perf_counter()
    F_real = np.array([F(s)[0] for s in S])
    fit_seconds = (time.perf_counter() - t0) / len(S)
    w_full = F(full[0])[1]
    d = X.shape[1]
    model = nn.Sequential(nn.Linear(d, 1))
    final = {"0.weight": torch.tensor(w_full[None, :d], dtype=torch.float32),
             "0.bias": torch.tensor(w_full[d:], dtype=torch.float32)}
    # GradEx features at W0 = 0 (the refits' cold start): the margin (2y - 1) x.w is linear in w, its
    # Jacobian exact (31 dims, no projection)
    Xa = np.hstack([X, np.ones((n, 1))])
    Xta = np.hstack([Xt, np.ones((len(Xt), 1))])
    src = HarvestedFeatures(np.zeros(n), (2 * y - 1)[:, None] * Xa, np.ones(n), task.astype(np.int64),
                            [f"cluster{k}" for k in range(K)], "margin")
    tgt = HarvestedFeatures(np.zeros(len(Xt)), (2 * yt - 1)[:, None] * Xta, np.ones(len(Xt)),
                            np.zeros(len(Xt), dtype=np.int64), ["target"], "margin")
    rows = np.arange(K + 1, len(S))
    return Problem("breast_cancer", [f"cluster{k}" for k in range(K)], S, F_real[None], rows[: n_random // 2],
                   rows[n_random // 2:], 0, np.arange(1, K + 1), model, final,
                   torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
                   torch.tensor(task, dtype=torch.long), torch.tensor(Xt, dtype=torch.float32),
                   torch.tensor(yt, dtype=torch.float32), None, (src, tgt), None, loss_kind="bce",
                   w0={k: torch.zeros_like(v) for k, v in final.items()}, retrain_seconds=fit_seconds,
                   notes={"design": f"all tasks, {K} leave-one-out, {n_random} random Bernoulli({p}) subsets with "
                                    "both classes; tuning = first half of the random ones, evaluation = second half",
                          "tasks": f"k-means (K = {K}, random_state 0) of the 455 standardized training points",
                          "task_sizes": np.bincount(task, minlength=K).tolist(),
                          "target": "mean log-loss of the 114 test points", "batch_seeds": "none (exact refits)",
                          "gradex_w0": "0 (the refits' cold start); exact Jacobians of the margin",
                          "gradex_features": "exact 31-dim Jacobians of the margin at W0 = 0 (no projection, no "
                                             "optimizer: the refit is a Newton solve, so no run record and "
                                             "AnalysisConfig()'s estimator='auto' takes GradEx's proximal solve)"})


# -- a tiny problem for the smoke test -------------------------------------------------------------
def tiny_problem(K: int = 5, n_per: int = 24, n_random: int = 12, seed: int = 0) -> Problem:
    """K sources of 2-class data (the first one with flipped labels), an MLP trained 2 epochs; every
    subset really retrained (seconds)."""
    from lightning_ksm.subsets import sample_subsets

    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(4, generator=g)
    x = torch.randn(K * n_per, 4, generator=g)
    task = torch.arange(K).repeat_interleave(n_per)
    y = (x @ w_true > 0).long()
    y[task == 0] = 1 - y[task == 0]
    xt = torch.randn(64, 4, generator=g)
    yt = (xt @ w_true > 0).long()

    def net():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    w0 = _state(net())

    def train_loop(hook=None, subset=None, bseed=0):
        model = net()
        model.load_state_dict(w0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        keep = torch.ones(len(x), dtype=torch.bool) if subset is None else torch.as_tensor(subset)[task]
        pos = torch.nonzero(keep).flatten()
        gen = torch.Generator().manual_seed(bseed)
        step = 0
        for _ in range(2):
            order = pos[torch.randperm(len(pos), generator=gen)]
            for b in range(0, len(order), 16):
                idx = order[b:b + 16]
                if hook is not None:
                    hook(model, opt, idx, step)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        return model, opt, step

    full = np.ones((1, K), dtype=bool)
    loo = ~np.eye(K, dtype=bool)
    rand = [r for r in sample_subsets(K, n_random, p=0.7, seed=seed, unique=True) if r.sum() >= 1]
    S = np.vstack([full, loo, np.array(rand, dtype=bool)])
    F_seeds = np.array([[float(nn.functional.cross_entropy(train_loop(subset=s, bseed=b)[0](xt), yt).detach())
                         for s in S] for b in (0, 1)])
    rows = np.arange(K + 1, len(S))
    model = train_loop()[0]
    return Problem("tiny", [f"t{k}" for k in range(K)], S, F_seeds, rows[: len(rows) // 2], rows[len(rows) // 2:],
                   0, np.arange(1, K + 1), net(), _state(model), x, y, task, xt, yt, train_loop, w0=w0)


def load_problem(name: str) -> Problem:
    if name == "project":
        return _project()
    if name == "breast_cancer":
        return _breast_cancer()
    if name.startswith("modular_"):
        return _modular(name.split("_", 1)[1])
    raise ValueError(f"unknown problem {name!r}; one of {PROBLEMS}")
