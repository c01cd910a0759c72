"""Meta-World MT10 with multi-task SAC: task attribution against real SAC runs (paper Tables 3-4).

What the recipe does:

1. **W0** (Lightning): train :class:`lightning_ksm.rl.SACModule` on all K tasks for
   ``pretrain_steps`` iterations (each steps every task's env once and runs one SAC update), and
   snapshot it (weights, optimizer states, replay buffer): ``<out>/w0.pt``.
2. **Attribution** (:func:`lightning_ksm.rl.attribute_policy`): the run continues from W0 on all
   tasks for ``finetune_steps`` iterations (the "one training run"; ``<out>/teacher.pt``). From W0
   and that run, GradEx estimates the policy after training on each of ``n_subsets`` random task
   subsets (target actions: the continued run's, ``targets="policy"``), measures it by seeded
   rollouts (F = minus the mean episode return), fits the kernel surrogate and writes the
   :class:`~lightning_ksm.AttributionReport` to ``<out>/report`` (scores, top-3 partners, groups).
   The same is done with critic-gradient target actions (``targets="critic"``, no continued run
   needed) for comparison (``<out>/report_critic``).
3. **Ground truth** (Lightning): real SAC fine-tuning from W0 on each evaluation subset (every
   subset of ``gt_subset_size`` tasks when there are at most ``gt_max_subsets`` of them, else a
   seeded sample) for ``finetune_steps`` iterations, once per seed in ``finetune_seeds`` (each
   seed shared by every subset: common random numbers), then the deterministic return on every
   task; the ground truth is the mean over the seeds, and the seed-vs-seed LDS is the noise ceiling. Results are cached in
   ``<out>/ground_truth.json`` as they come, so a killed run resumes.
4. **LDS**: Spearman correlation, per target, between the real F on the evaluation subsets and the
   predictions of the kernel and linear surrogates fitted on GradEx estimates (paper Table 3:
   0.80 vs 0.76 on MT10), and of the raw GradEx estimates on the same subsets.
5. **Task selection** (paper Table 4): for each target task, the real return when it is
   fine-tuned with its top-3 partners recommended by the kernel surrogate, by the linear
   surrogate, and with random partners (the exact mean over every partner triple when all of them
   were run, else ``random_draws`` seeded draws).

Budgets (``--config``): ``quick`` (3 tasks, a few hundred steps; the CI smoke test runs it),
``cpu`` (the reduced run whose numbers are in ``benchmarks/results/mt10.json``: 6 tasks, short
training, 150-step episodes), ``gpu`` (MT10 at a realistic scale, sized for one GPU; not run here).
The recipe measures and records its own cost (env steps/s, SAC updates/s, wall and CPU seconds per
phase, ``budget`` in the results JSON). Measured for ``--config cpu`` on the shared 2-core CPU box
(torch 1 thread): 32 real SAC runs and 282,000 env steps in 716 CPU s (1,421 s wall with other jobs
running); SAC fine-tuning ran at 62 updates/s and 247 env steps/s (4 tasks, one update per
iteration), the 6-task runs at 25-74 updates/s depending on the load; the attribution (40 subsets,
36,000 rollout steps) took 19 s. At those rates the ``gpu`` configuration would take days on a CPU.

Run: ``python -m recipes.mt10_sac --config cpu --out runs/mt10`` (add ``--results
benchmarks/results/mt10.json`` to write the results file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `lightning_ksm` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_ksm.fileio import torch_load_safe  # noqa: E402
from lightning_ksm.metrics import lds  # noqa: E402
from lightning_ksm.rl.attribution import PolicyGradEx, RLAttributionConfig, attribute_policy  # noqa: E402
from lightning_ksm.rl.envs import MT10_TASKS, resolve_env_names  # noqa: E402

# What the `mt10` configuration reports, fixed before its ground truth was run (issue 15).
PREREGISTRATION = {
    "config": "mt10",
    "command": "python -m recipes.mt10_sac --config mt10 --out runs/mt10_10tasks --workers 2 "
               "--results benchmarks/results/mt10_10tasks.json",
    "method": "teacher targets (targets='policy', the continued run's actions), ridge 1.0, k = 128 Gaussian "
              "projection, 60 training subsets of 7 tasks for the surrogates; critic targets as a secondary row",
    "ground_truth": "real SAC fine-tuning from W0 for 2,000 iterations on 24 seeded evaluation subsets of 7 of "
                    "the 10 tasks, fine-tuning seeds 1, 2 (shared by every subset); F = minus the mean "
                    "return over the two seeds, per task",
    "primary": "LDS (Spearman over the 24 evaluation subsets) of KernelSM, per target, mean over the 10 tasks",
    "also_reported": [
        "LDS of the linear surrogate and of the raw GradEx estimates on the same subsets",
        "noise ceiling: mean pairwise seed-vs-seed LDS of the real F, and each seed against the mean of the others",
        "baseline -|s|: constant on this design (every evaluation subset has 7 tasks), so undefined; "
        "within-size LDS is the LDS itself",
        "baseline 'target in subset': F = -1[target in s]",
        "task selection (paper Table 4): each target fine-tuned with its top-3 partners by KernelSM and by the "
        "linear surrogate vs 2 seeded random partner triples, real return on the target (fine-tuning seed 1, "
        "shared by every triple)",
        "the CPU budget used",
    ],
    "rule": "no method change after seeing this ground truth; if one is made, both results are reported",
    "amendments": [
        "2026-12-02 01:25 UTC, budget only, before any ground-truth outcome was analysed (2 of the 72 runs "
        "existed): fine-tuning seeds (1, 2, 3) -> (1, 2). Measured cost on the shared 2-core box: 78 CPU s "
        "per 7-task run plus its evaluation, so 3 seeds (~170 runs with the task selection) did not fit the "
        "session; 2 seeds is the issue's minimum. The noise ceiling is then the one seed pair.",
        "2026-12-02 01:50 UTC, budget only, before any task-selection run existed (8 of the 48 ground-truth "
        "runs done, none analysed): the task-selection runs use fine-tuning seed 1 only (selection_seeds), "
        "~30 runs instead of ~60; the comparison stays paired (every triple with the same seed).",
    ],
}

PAPER = {"lds": {"linear_surrogate": 0.76, "kernelsm": 0.80},
         "table4_rewards": {"linear_surrogate": 13.1, "kernelsm": 18.8}}


@dataclass
class RecipeConfig:
    """Every setting of the recipe (recorded in the results JSON)."""

    tasks: list = field(default_factory=lambda: list(MT10_TASKS))
    hidden: tuple = (256, 256)
    batch_size: int = 256
    lr: float = 3e-4
    reward_scale: float = 0.1
    max_episode_steps: int = 500
    pretrain_steps: int = 20_000
    warmup_steps: int = 1_000
    finetune_steps: int = 10_000
    seed: int = 0
    finetune_seeds: tuple = (1,)  # ground truth = mean over these fine-tuning seeds
    env_seed: int = 0
    # attribution
    n_subsets: int = 40
    subset_size: int = 0  # 0: Bernoulli(subset_p); None: round(0.7 K)
    subset_p: float = 0.7
    n_per_task: int = 256
    proj_dim: int = 128
    action_step: float = 0.3
    ridge: float = 1.0
    top_k: int = 3
    # ground truth
    gt_subset_size: int = 4
    gt_max_subsets: int = 20
    gt_subsets: int = 16  # sampled when there are more than gt_max_subsets
    random_draws: int = 3
    critic_selection: bool = True  # also run the task selection of the critic-target report
    selection_seeds: Optional[tuple] = None  # fine-tuning seeds of the task-selection runs (None: finetune_seeds)
    accelerator: str = "cpu"


CONFIGS = {
    # CI smoke test: 3 tasks, tiny networks, short episodes (< 60 s on 2 shared cores).
    "quick": RecipeConfig(
        tasks=["reach-v3", "window-close-v3", "door-open-v3"], hidden=(32, 32), batch_size=64,
        max_episode_steps=30, pretrain_steps=300, warmup_steps=100, finetune_steps=100, n_subsets=10,
        n_per_task=48, proj_dim=32, top_k=1, gt_subset_size=2, gt_max_subsets=3, random_draws=1,
    ),
    # The reduced CPU budget of benchmarks/results/mt10.json: 6 tasks with dense early rewards.
    "cpu": RecipeConfig(
        tasks=["reach-v3", "door-open-v3", "drawer-open-v3", "window-open-v3", "window-close-v3",
               "button-press-topdown-v3"],
        hidden=(128, 128), batch_size=128, max_episode_steps=150, pretrain_steps=5000, warmup_steps=500,
        finetune_steps=2000, n_subsets=40, n_per_task=256, proj_dim=128, gt_subset_size=4, gt_max_subsets=15,
        finetune_seeds=(1, 2),
    ),
    # Issue 15, PRE-REGISTERED (committed before its ground truth existed; see PREREGISTRATION):
    # all ten MT10 tasks at a CPU budget, evaluation subsets of 7 tasks, three fine-tuning seeds.
    "mt10": RecipeConfig(
        tasks=list(MT10_TASKS), hidden=(128, 128), batch_size=128, max_episode_steps=150, pretrain_steps=8000,
        warmup_steps=500, finetune_steps=2000, finetune_seeds=(1, 2), n_subsets=60, subset_size=7,
        n_per_task=256, proj_dim=128, action_step=0.3, ridge=1.0, top_k=3, gt_subset_size=7, gt_max_subsets=0,
        gt_subsets=24, random_draws=2, critic_selection=False, selection_seeds=(1,),
    ),
    # MT10 at a realistic scale for one GPU (not run on the CPU box): the paper's 7-of-10 subsets.
    "gpu": RecipeConfig(
        tasks=list(MT10_TASKS), hidden=(400, 400, 400), batch_size=1280, max_episode_steps=500,
        pretrain_steps=200_000, warmup_steps=5_000, finetune_steps=100_000, n_subsets=200, subset_size=7,
        n_per_task=2048, proj_dim=512, gt_subset_size=4, gt_max_subsets=0, gt_subsets=50, random_draws=5,
        accelerator="gpu",
    ),
}


# ---------------------------------------------------------------------------------------------


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _trainer(cfg: RecipeConfig, out: str):
    import lightning.pytorch as L

    return L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator=cfg.accelerator, devices=1, default_root_dir=out,
    )


def _fit(module, cfg: RecipeConfig, out: str) -> dict:
    """Train ``module`` for its ``steps`` iterations; returns its measured cost."""
    n_envs = len(module.active_tasks)
    u0, wall, cpu = module.updates, time.perf_counter(), time.process_time()
    _trainer(cfg, out).fit(module)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = int(module.hparams.steps)
    return {
        "iterations": steps, "env_steps": steps * n_envs, "updates": module.updates - u0,
        "wall_s": wall, "cpu_s": cpu, "env_steps_per_s": steps * n_envs / wall,
        "updates_per_s": (module.updates - u0) / wall, "iterations_per_s": steps / wall,
    }


def _returns(evaluation: dict, tasks: list) -> list:
    return [evaluation[t]["return"] for t in tasks]


def evaluation_subsets(cfg: RecipeConfig, K: int) -> np.ndarray:
    """Every subset of ``gt_subset_size`` tasks, or a seeded sample of ``gt_subsets`` of them."""
    combos = list(combinations(range(K), cfg.gt_subset_size))
    if len(combos) > cfg.gt_max_subsets:
        rng = np.random.default_rng(cfg.seed + 17)
        combos = [combos[i] for i in sorted(rng.choice(len(combos), size=min(cfg.gt_subsets, len(combos)), replace=False))]
    S = np.zeros((len(combos), K), dtype=bool)
    for r, c in enumerate(combos):
        S[r, list(c)] = True
    return S


def _fine_tune_record(snap: dict, cfg: RecipeConfig, out: str, mask, seed: int) -> dict:
    """One real SAC fine-tuning run from W0 on ``mask`` with ``seed``: returns and cost."""
    from lightning_ksm.rl import SACModule

    tasks = [t for t, b in zip(cfg.tasks, mask) if b]
    module = SACModule.from_snapshot(snap, active_tasks=tasks, steps=cfg.finetune_steps, seed=seed)
    cost = _fit(module, cfg, out)
    start = time.perf_counter()
    ev = module.evaluate(episodes=1, seed=0)
    cost["eval_s"] = time.perf_counter() - start
    return {"tasks": tasks, "returns": _returns(ev, cfg.tasks),
            "success": [ev[t]["success_rate"] for t in cfg.tasks], "cost": cost}


_WORKER_SNAPSHOT: dict = {}


def _worker_run(w0_path: str, cfg: RecipeConfig, out: str, mask, seed: int) -> dict:
    """Process-pool entry point: loads W0 once per worker process, runs one fine-tuning."""
    _quiet()
    torch.set_num_threads(1)
    if w0_path not in _WORKER_SNAPSHOT:
        _WORKER_SNAPSHOT[w0_path] = torch_load_safe(w0_path, numpy=True)["snapshot"]
    return _fine_tune_record(_WORKER_SNAPSHOT[w0_path], cfg, out, mask, seed)


class GroundTruth:
    """Real SAC fine-tuning from W0 on task subsets (one run per fine-tuning seed), cached on disk
    (resumable); :meth:`returns` is the mean over the seeds. :meth:`prefetch` runs the missing
    ones in ``workers`` processes (each run is seeded on its own, so the result does not depend
    on the number of workers)."""

    def __init__(self, snap: dict, cfg: RecipeConfig, out: str, workers: int = 1) -> None:
        self.snap, self.cfg, self.out, self.workers = snap, cfg, out, int(workers)
        self.path = os.path.join(out, "ground_truth.json")
        self.cache = json.load(open(self.path)) if os.path.exists(self.path) else {}

    @staticmethod
    def key(mask, seed=None) -> str:
        bits = "".join("1" if b else "0" for b in mask)
        return bits if seed is None else f"{bits}@{seed}"

    def has(self, mask, seeds=None) -> bool:
        return all(self.key(mask, s) in self.cache for s in (seeds or self.cfg.finetune_seeds))

    def returns(self, mask, seeds=None) -> list:
        """Per-task returns (all K tasks) after fine-tuning on ``mask``, mean over the seeds
        (``seeds``; default the configuration's ``finetune_seeds``)."""
        return np.mean([self.run(mask, s) for s in (seeds or self.cfg.finetune_seeds)], axis=0).tolist()

    def _store(self, k: str, record: dict) -> None:
        self.cache[k] = record
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.cache, fh, indent=1)
        os.replace(tmp, self.path)
        print(f"  ground truth {k} {record['tasks']}: mean return {np.mean(record['returns']):.1f} "
              f"({record['cost']['wall_s']:.0f} s)", flush=True)

    def run(self, mask, seed: int) -> list:
        """Per-task returns after one fine-tuning run on ``mask`` with ``seed``."""
        k = self.key(mask, seed)
        if k not in self.cache:
            self._store(k, _fine_tune_record(self.snap, self.cfg, self.out, mask, seed))
        return self.cache[k]["returns"]

    def prefetch(self, masks, seeds=None) -> None:
        """Run every (mask, seed) not yet cached, in ``workers`` processes when more than one."""
        todo, seen = [], set()
        for mask in masks:
            for s_ in (seeds or self.cfg.finetune_seeds):
                k = self.key(mask, s_)
                if k not in self.cache and k not in seen:
                    seen.add(k)
                    todo.append((np.asarray(mask, dtype=bool), s_))
        if self.workers <= 1 or len(todo) <= 1:
            for mask, s_ in todo:
                self.run(mask, s_)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        w0_path = os.path.join(self.out, "w0.pt")
        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_worker_run, w0_path, self.cfg, self.out, m, s_): self.key(m, s_) for m, s_ in todo}
            for fut in as_completed(futures):
                self._store(futures[fut], fut.result())


def selection_plan(report, gt: GroundTruth, cfg: RecipeConfig, K: int) -> dict:
    """Per target: the partner triples to really run (the surrogates' top-k and the random ones)."""
    names = list(cfg.tasks)
    size = cfg.top_k + 1
    rng = np.random.default_rng(cfg.seed + 29)
    plan = {}
    for t, target in enumerate(names):
        col = report.target_names.index(target)

        def partners(scores):
            order = [int(i) for i in np.argsort(-scores[:, col], kind="stable") if i != t]
            return order[: cfg.top_k]

        others = [i for i in range(K) if i != t]
        all_triples = list(combinations(others, cfg.top_k))
        enumerated = all(gt.has(_mask(K, (t, *c)), cfg.selection_seeds) for c in all_triples) and cfg.gt_subset_size == size
        draws = all_triples if enumerated else [tuple(sorted(rng.choice(others, cfg.top_k, replace=False)))
                                                 for _ in range(cfg.random_draws)]
        plan[target] = {"t": t, "kernel": partners(report.scores["ensemble"]), "linear": partners(report.scores["linear"]),
                        "random": draws, "enumerated": bool(enumerated)}
    return plan


def task_selection(report, gt: GroundTruth, cfg: RecipeConfig, K: int) -> dict:
    """Paper Table 4: target return with recommended vs random top-k partners (real runs)."""
    names = list(cfg.tasks)
    plan = selection_plan(report, gt, cfg, K)
    seeds = cfg.selection_seeds
    gt.prefetch([_mask(K, (p["t"], *c)) for p in plan.values() for c in [p["kernel"], p["linear"], *p["random"]]],
                seeds)
    rows = {}
    for target, p in plan.items():
        t = p["t"]
        rand = [gt.returns(_mask(K, (t, *c)), seeds)[t] for c in p["random"]]
        rows[target] = {
            "kernel_partners": [names[i] for i in p["kernel"]],
            "kernel_return": gt.returns(_mask(K, (t, *p["kernel"])), seeds)[t],
            "linear_partners": [names[i] for i in p["linear"]],
            "linear_return": gt.returns(_mask(K, (t, *p["linear"])), seeds)[t],
            "random_return": float(np.mean(rand)),
            "random_return_std": float(np.std(rand)),
            "random_partner_sets": len(p["random"]),
            "random_is_exact_mean": p["enumerated"],
            "best_possible_return": float(np.max(rand)) if p["enumerated"] else None,
        }
    summary = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("kernel_return", "linear_return", "random_return")}
    return {"per_target": rows, "mean": summary}


def _lds_columns(F_true, F_pred) -> np.ndarray:
    """Per-column Spearman (NaN where a column is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return np.asarray(lds(F_true, F_pred, return_per_column=True).per_column, dtype=float)
        except ValueError:  # every column constant: no ranking at all
            return np.full(np.shape(F_true)[1], np.nan)


def _nanmean(values) -> Optional[float]:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _mask(K: int, idx) -> np.ndarray:
    m = np.zeros(K, dtype=bool)
    m[list(idx)] = True
    return m


def run(cfg: RecipeConfig, out: str, results_path: Optional[str] = None, threads: int = 1, workers: int = 1) -> dict:
    """The whole recipe (see the module docstring); returns the results dict."""
    from lightning_ksm.rl import SACModule

    _quiet()
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    cfg = replace(cfg, tasks=resolve_env_names(cfg.tasks))  # bad names fail here, before anything is built
    K = len(cfg.tasks)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phases: dict = {}

    # 1. W0 --------------------------------------------------------------------------------------
    w0_path = os.path.join(out, "w0.pt")
    loaded = os.path.exists(w0_path)
    if loaded:
        blob = torch_load_safe(w0_path, numpy=True)
        snap, phases["pretrain"] = blob["snapshot"], blob["cost"]
        print(f"W0 loaded from {w0_path}", flush=True)
    else:
        module = SACModule(
            cfg.tasks, hidden=tuple(cfg.hidden), batch_size=cfg.batch_size, lr=cfg.lr, reward_scale=cfg.reward_scale,
            max_episode_steps=cfg.max_episode_steps, steps=cfg.pretrain_steps, warmup_steps=cfg.warmup_steps,
            seed=cfg.seed, env_seed=cfg.env_seed, buffer_size=max(100_000, (cfg.pretrain_steps + cfg.finetune_steps) * K),
        )
        print(f"pretraining on {K} tasks for {cfg.pretrain_steps} iterations ...", flush=True)
        phases["pretrain"] = _fit(module, cfg, out)
        snap = module.snapshot()
        torch.save({"snapshot": snap, "cost": phases["pretrain"]}, w0_path)
        print(f"  {phases['pretrain']['env_steps_per_s']:.0f} env steps/s, "
              f"{phases['pretrain']['updates_per_s']:.1f} updates/s", flush=True)
    w0 = SACModule.from_snapshot(snap)
    start, c = time.perf_counter(), time.process_time()
    w0_eval = w0.evaluate(episodes=1, seed=0)
    phases["w0_eval"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c}

    # 2. the run continues on all tasks (the teacher), and attribution from W0 ------------------
    teacher_path = os.path.join(out, "teacher.pt")
    if os.path.exists(teacher_path):
        blob = torch_load_safe(teacher_path, numpy=True)
        teacher, phases["continued_run"] = SACModule.from_snapshot(blob["snapshot"]), blob["cost"]
    else:
        teacher = SACModule.from_snapshot(snap, steps=cfg.finetune_steps)  # same RNG streams: the run goes on
        phases["continued_run"] = _fit(teacher, cfg, out)
        torch.save({"snapshot": teacher.snapshot(), "cost": phases["continued_run"]}, teacher_path)
    teacher_eval = teacher.evaluate(episodes=1, seed=0)
    acfg = RLAttributionConfig(
        n_per_task=cfg.n_per_task, proj_dim=cfg.proj_dim, action_step=cfg.action_step, ridge=cfg.ridge,
        n_subsets=cfg.n_subsets, subset_size=cfg.subset_size, subset_p=cfg.subset_p, top_k=cfg.top_k, seed=cfg.seed,
        targets="policy",
    )
    start, c = time.perf_counter(), time.process_time()
    est = PolicyGradEx(w0, acfg, teacher=teacher)
    report = attribute_policy(w0, acfg, estimator=est)
    report.save(os.path.join(out, "report"), figures=False)
    phases["attribution"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c,
                             "rollout_env_steps": est.rollout_steps, **report.timings}
    start, c = time.perf_counter(), time.process_time()
    est_critic = PolicyGradEx(w0, replace(acfg, targets="critic"))
    report_critic = attribute_policy(w0, est_critic.cfg, estimator=est_critic)
    report_critic.save(os.path.join(out, "report_critic"), figures=False)
    phases["attribution_critic_targets"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c}
    print(f"attribution: {phases['attribution']['wall_s']:.0f} s; heldout LDS kernel "
          f"{report.fit_quality['heldout_lds']:.2f} linear {report.fit_quality['linear_heldout_lds']:.2f}", flush=True)

    # 3. ground truth on the evaluation subsets, and GradEx on the same subsets ------------------
    S_eval = evaluation_subsets(cfg, K)
    start, c = time.perf_counter(), time.process_time()
    F_hat_tasks, _ = est.losses(S_eval)
    F_hat_critic, _ = est_critic.losses(S_eval)
    phases["gradex_on_eval_subsets"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c}
    gt = GroundTruth(snap, cfg, out, workers=workers)
    print(f"ground truth: {len(S_eval)} subsets x {cfg.finetune_steps} iterations ...", flush=True)
    start, c = time.perf_counter(), time.process_time()
    gt.prefetch(S_eval)
    R_true = np.array([gt.returns(mask) for mask in S_eval])
    phases["ground_truth"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c}

    # 4. LDS -------------------------------------------------------------------------------------
    F_true = -R_true
    F_true = np.concatenate([F_true, F_true.mean(1, keepdims=True)], axis=1)
    F_hat = np.concatenate([F_hat_tasks, F_hat_tasks.mean(1, keepdims=True)], axis=1)
    preds = {"kernel": report.surrogate_.predict(S_eval), "linear": report.linear_surrogate_.predict(S_eval),
             "gradex_direct": F_hat,
             "critic_targets_kernel": report_critic.surrogate_.predict(S_eval),
             "critic_targets_linear": report_critic.linear_surrogate_.predict(S_eval),
             "critic_targets_gradex_direct": np.concatenate([F_hat_critic, F_hat_critic.mean(1, keepdims=True)], axis=1)}
    targets = report.target_names
    lds_table = {}
    for name, P in preds.items():
        per_col = _lds_columns(F_true, np.asarray(P).reshape(F_true.shape))
        lds_table[name] = {"mean_over_tasks": _nanmean(per_col[:K]), "all": float(per_col[K]),
                           "per_target": dict(zip(targets, [float(v) for v in per_col]))}

    # Trivial baselines: "more tasks = lower loss" (-|s|), and "the target itself is trained on".
    sizes = S_eval.sum(1).astype(float)
    baselines = {"baseline_minus_size": np.repeat(-sizes[:, None], K + 1, axis=1),
                 "baseline_target_in_subset": np.concatenate([-S_eval.astype(float), -sizes[:, None]], axis=1)}
    for name, P in baselines.items():
        per_col = _lds_columns(F_true, P)
        lds_table[name] = {"mean_over_tasks": _nanmean(per_col[:K]), "all": float(per_col[K]),
                           "per_target": dict(zip(targets, [float(v) for v in per_col]))}
    if np.ptp(sizes) == 0:
        lds_table["baseline_minus_size"]["note"] = (f"undefined: every evaluation subset has {int(sizes[0])} tasks, "
                                                    "so -|s| is constant (and LDS within size is the LDS itself)")

    # Noise ceiling: how well one fine-tuning seed's real F ranks the subsets like another's.
    seeds = list(cfg.finetune_seeds)
    if len(seeds) > 1:
        per_seed = [-np.array([gt.run(mask, s_) for mask in S_eval]) for s_ in seeds]
        per_seed = [np.concatenate([F_, F_.mean(1, keepdims=True)], axis=1) for F_ in per_seed]
        pairs = list(combinations(range(len(seeds)), 2))
        pair_cols = np.array([_lds_columns(per_seed[i], per_seed[j]) for i, j in pairs])
        per_col = np.nanmean(pair_cols, axis=0)
        lds_table["seed_vs_seed"] = {"mean_over_tasks": _nanmean(per_col[:K]), "all": float(per_col[K]),
                                     "per_target": dict(zip(targets, [float(v) for v in per_col])),
                                     "per_pair": {f"{seeds[i]}-{seeds[j]}": _nanmean(c[:K]) for (i, j), c in zip(pairs, pair_cols)},
                                     "note": "real F of one fine-tuning seed vs another, mean over the seed pairs: "
                                             "the noise ceiling of a single seed"}
        if len(seeds) > 2:
            rest_cols = np.array([_lds_columns(per_seed[i], np.mean([per_seed[j] for j in range(len(seeds)) if j != i], 0))
                                  for i in range(len(seeds))])
            per_col = np.nanmean(rest_cols, axis=0)
            lds_table["seed_vs_rest"] = {"mean_over_tasks": _nanmean(per_col[:K]), "all": float(per_col[K]),
                                         "per_target": dict(zip(targets, [float(v) for v in per_col])),
                                         "note": "each seed's real F vs the mean of the other seeds, mean over seeds"}

    # 5. task selection --------------------------------------------------------------------------
    start, c = time.perf_counter(), time.process_time()
    selection = task_selection(report, gt, cfg, K)
    selection_critic = task_selection(report_critic, gt, cfg, K) if cfg.critic_selection else None
    phases["task_selection_extra_runs"] = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - c}

    runs = list(gt.cache.values())
    ft = [r["cost"] for r in runs]
    # Everything behind the numbers, including phases cached by an earlier invocation (their records).
    counted = ("pretrain", "continued_run", "attribution", "attribution_critic_targets", "gradex_on_eval_subsets")
    results_cpu = sum(phases[p_]["cpu_s"] for p_ in counted) + sum(f["cpu_s"] for f in ft)
    results_wall = sum(phases[p_]["wall_s"] for p_ in counted) + sum(f["wall_s"] + f.get("eval_s", 0.0) for f in ft)
    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "paper": PAPER,
        "budget": {
            "results_cpu_s": results_cpu,
            "results_wall_s": results_wall,
            "this_invocation_wall_s": time.perf_counter() - wall0,
            "this_invocation_cpu_s": time.process_time() - cpu0,
            "torch_threads": threads,
            "phases": phases,
            "real_sac_runs": 2 + len(runs),  # W0, the continued run, the subset runs
            "finetune_env_steps_per_s": float(np.mean([f["env_steps_per_s"] for f in ft])) if ft else None,
            "finetune_updates_per_s": float(np.mean([f["updates_per_s"] for f in ft])) if ft else None,
            "env_steps_total": phases["pretrain"]["env_steps"] + phases["continued_run"]["env_steps"]
            + sum(f["env_steps"] for f in ft),
            "ground_truth_runs": {"count": len(ft), "cpu_s": sum(f["cpu_s"] for f in ft),
                                  "wall_s": sum(f["wall_s"] for f in ft)},
            "note": ("results_* count every phase behind these numbers, cached ones from their records; "
                     "this_invocation_* only the last invocation of the recipe. Wall seconds are on a 2-core "
                     "box shared with other jobs (wall > CPU when it was busy)."),
        },
        "w0_returns": {t: w0_eval[t]["return"] for t in cfg.tasks},
        "continued_run_returns": {t: teacher_eval[t]["return"] for t in cfg.tasks},
        "w0_success": {t: w0_eval[t]["success_rate"] for t in cfg.tasks},
        "attribution": {
            "heldout_lds_on_gradex": {"kernel": report.fit_quality["heldout_lds"],
                                      "linear": report.fit_quality["linear_heldout_lds"]},
            "top_partners": {b["target"]: b["top_partners"] for b in report.best_subsets},
            "groups": [g["tasks"] for g in report.groups],
            "ensemble_scores": {t: dict(zip(report.task_names, [float(v) for v in report.scores["ensemble"][:, j]]))
                                for j, t in enumerate(targets)},
            "gradex_lambda": report.fit_quality.get("gradex_lambda"),
            "linearization_error": report.fit_quality.get("linearization_error"),
            "critic_targets": {
                "heldout_lds_on_gradex": {"kernel": report_critic.fit_quality["heldout_lds"],
                                          "linear": report_critic.fit_quality["linear_heldout_lds"]},
                "top_partners": {b["target"]: b["top_partners"] for b in report_critic.best_subsets},
                "linearization_error": report_critic.fit_quality.get("linearization_error"),
            },
        },
        "evaluation_subsets": [[cfg.tasks[i] for i in np.flatnonzero(m)] for m in S_eval],
        "true_returns": R_true.tolist(),
        "true_returns_per_seed": {str(s_): [gt.run(mask, s_) for mask in S_eval] for s_ in cfg.finetune_seeds},
        "gradex_estimated_returns": (-F_hat_tasks).tolist(),
        "gradex_estimated_returns_critic_targets": (-F_hat_critic).tolist(),
        "lds": lds_table,
        "task_selection": selection,
        "task_selection_critic_targets": selection_critic,
    }
    if asdict(cfg) == asdict(replace(CONFIGS["mt10"], tasks=resolve_env_names(CONFIGS["mt10"].tasks))):
        results["preregistration"] = PREREGISTRATION
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    if results_path:
        import platform

        payload = {"benchmark": "mt10", "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                    "torch": torch.__version__, "machine": platform.machine()},
                   "command": " ".join(sys.argv), **results}
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        tmp = results_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1)
        os.replace(tmp, results_path)
        print(f"wrote {results_path}")
    print(json.dumps({"lds": {k: v["mean_over_tasks"] for k, v in lds_table.items()},
                      "task_selection": selection["mean"], "results_cpu_s": results_cpu}, indent=1))
    return results


def main(argv=None) -> dict:
    """Command line: ``--config quick|cpu|gpu``, ``--out DIR``, ``--results FILE``, overrides."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--quick", action="store_true", help="same as --config quick")
    ap.add_argument("--out", default="runs/mt10")
    ap.add_argument("--results", default=None, help="also write the results JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared CPU)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the real fine-tuning runs (1 thread each)")
    ap.add_argument("--tasks", nargs="+", default=None, help="override the task list")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = CONFIGS["quick" if args.quick else args.config]
    overrides = {k: v for k, v in {"tasks": args.tasks, "pretrain_steps": args.pretrain_steps,
                                   "finetune_steps": args.finetune_steps, "seed": args.seed}.items() if v is not None}
    cfg = replace(cfg, **overrides)
    return run(cfg, args.out, args.results, args.threads, args.workers)


if __name__ == "__main__":
    main()
