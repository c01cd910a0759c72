"""Task attribution for multi-task RL: the adapter between a SAC run and the lightning-ksm engine.

The tasks are the environments. From one snapshot W0 of the SAC module (actor, critic, replay
buffer) the adapter estimates, for every task subset s, the policy that further training on s would
give, and measures it by short rollouts, without training on s:

1. **Source data** (:func:`harvest_policy_features`): ``n_per_task`` replay transitions per source
   task, with their task ids. For each, the snapshot policy's deterministic action
   ``a0 = tanh(mu(x))`` and a *target action* ``a*``, where training moves that state's action:

   - ``targets="policy"`` (default when a ``teacher`` is given): the action of the same run's
     policy after it kept training on all tasks (e.g. the final weights, when W0 was an earlier
     snapshot). This is the one-training-run setting of the paper: the run itself shows, state by
     state, where SAC moved the policy; GradEx asks which part of that move each task subset
     would reproduce through the shared weights.
   - ``targets="critic"``: one deterministic-policy-gradient step uphill on the snapshot critic,
     ``a* = a0 + eta * grad_a Q(x, a0) / c`` (``c`` the mean gradient norm, so ``eta`` =
     ``action_step`` is in action units). Needs no later weights, but relies on the snapshot
     critic's action gradients, which early in training can point the wrong way (docs/rl.md).

   The engine's :func:`~lightning_ksm.harvesting.harvest` gives the projected Jacobians of ``a0``
   with respect to the actor's weights (mode ``"logits"``: one row per action coordinate).
2. **GradEx** (:func:`~lightning_ksm.estimation.solve_subsets`, squared loss): the linearized actor
   update of each subset, ``Z_s = argmin sum_t a_st sum_i |a0_i + J_i z - a*_i|^2 / 2 + lam/2 |z|^2``
   (a linearized SAC actor update toward the target actions of the subset's states).
3. **Estimated policy** (:func:`policy_params_from_solutions`): the projected problem is exactly
   fine-tuning within the k-dimensional weight subspace spanned by the projection's rows, so
   ``W_s = W0 + P^T Z_s`` is the weight change; ``P^T z`` is computed by autograd through the
   projector (no k x d matrix).
4. **F^(s)** (:func:`rollout_losses`): seeded deterministic rollouts of ``W_s`` on every target task.
   F is a loss: **F = -(mean episode return)** per target task, and the column ``"all"`` is the
   mean over the target tasks. The cost is rollouts, not training.
5. **Readouts** (:func:`report_from_losses`): the same kernel surrogate, scores, interactions, best
   subsets and co-training groups as :func:`lightning_ksm.run_analysis`, plus the top-k co-training
   partners of each target task (the paper's task selection), as an
   :class:`~lightning_ksm.AttributionReport`.

Only engine modules are used (harvest, projection, gradex, surrogates, attribution, report): no
Lightning import here.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..config import AnalysisConfig, HarvestConfig
from ..analysis import report_from_losses as _report_from_losses
from ..features import HarvestedFeatures
from ..estimation import solve_subsets
from ..harvesting import harvest, projector_for_model
from ..harvesting.params import resolve_projection, select_parameters
from ..harvesting.projection import Projector
from ..report import AttributionReport
from ..subsets import sample_subsets
from .config import RLAttributionConfig
from .evaluate import rollout_returns

__all__ = [
    "RLAttributionConfig",
    "PolicyGradEx",
    "attribute_policy",
    "harvest_policy_features",
    "back_project",
    "policy_params_from_solutions",
    "rollout_losses",
    "report_from_losses",
    "top_partners",
]


# -- 1. source features --------------------------------------------------------------------------


def _task_positions(module, tasks, what: str) -> list:
    names = list(module.task_names) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    if not names:
        raise ValueError(f"{what} is empty: the task subset has no environments")
    unknown = [n for n in names if n not in module.task_names]
    if unknown:
        raise ValueError(f"{what} {unknown} are not among the module's tasks {module.task_names}")
    return names


def improved_actions(module, x: torch.Tensor, action_step: float, *, scale: Optional[float] = None):
    """Snapshot actions ``a0``, improved actions ``a*`` and the gradient scale used (see module docs)."""
    with torch.enable_grad():
        a0 = module.actor.deterministic(x).detach().requires_grad_(True)
        q = module.critic.min_q(x, a0).sum()
        (g,) = torch.autograd.grad(q, a0)
    if scale is None:
        scale = float(g.norm(dim=1).mean())
    scale = scale if scale > 0 else 1.0
    target = (a0.detach() + action_step * g / scale).clamp(-0.999, 0.999)
    return a0.detach(), target, scale


def harvest_policy_features(
    module,
    *,
    tasks: Optional[Sequence[str]] = None,
    n_per_task: int = 256,
    projector: Optional[Projector] = None,
    projection: str = "gaussian",
    proj_dim: int = 128,
    proj_seed: int = 0,
    action_step: float = 0.3,
    teacher=None,
    seed: int = 0,
    chunk_size: int = 64,
) -> tuple[HarvestedFeatures, Projector]:
    """Per-transition features of the snapshot policy for GradEx (squared loss).

    Returns ``(features, projector)``: ``features.outputs`` are the deterministic actions ``a0``
    ``(n, A)``, ``features.jacobians`` their projected Jacobians ``(n, A, k)`` with respect to all
    actor weights, ``features.labels`` the target actions ``a*`` ``(n, A)``: the ``teacher``
    module's deterministic actions when one is given, else one critic-gradient step of size
    ``action_step``; ``task_ids`` index ``tasks`` (default: all of the module's tasks), mode
    ``"custom"``.
    """
    names = _task_positions(module, tasks, "tasks")
    ids = [module.task_names.index(n) for n in names]
    counts = module.buffer.task_counts()
    empty = [n for n, i in zip(names, ids) if counts[i] == 0]
    if empty:
        raise ValueError(f"the replay buffer holds no transition of task(s) {empty}; collect data for them first")
    if projector is None:
        if projection == "auto":  # as the harvest runner resolves it (one draw here)
            projection = resolve_projection(module.actor, select_parameters(module.actor),
                                            HarvestConfig(projection="auto", proj_dim=proj_dim, proj_draws=1))
        k = None if projection == "identity" else proj_dim
        projector = projector_for_model(module.actor, projection, k, proj_seed)
    idx = module.buffer.per_task_indices(n_per_task, ids, seed=seed)
    batch = module.buffer.batch(idx, device=module.device)
    x = module._inputs(batch["obs"], batch["task_ids"])
    was_training = module.training
    module.eval()
    try:
        if teacher is None:
            _, target, scale = improved_actions(module, x, action_step)
        else:
            if list(teacher.task_names) != list(module.task_names):
                raise ValueError(
                    f"the teacher's tasks {teacher.task_names} differ from the module's {module.task_names}; "
                    "the teacher must be the same run (same one-hot layout) at a later point"
                )
            with torch.no_grad():
                target = teacher.actor.deterministic(x.to(teacher.device)).to(x.device)
            scale = float("nan")
        local = [names[ids.index(int(t))] for t in batch["task_ids"].tolist()]
        feats = harvest(
            module.actor, [(x, torch.zeros(len(x), dtype=torch.long), local)], projector=projector,
            mode="logits", forward_fn=lambda actor, inp: actor.deterministic(inp), task_names=names,
            chunk_size=chunk_size,
        )
    finally:
        module.train(was_training)
    features = HarvestedFeatures(
        outputs=feats.outputs, jacobians=feats.jacobians, labels=target.cpu().numpy().astype(feats.outputs.dtype),
        task_ids=feats.task_ids, task_names=list(names), mode="custom",
    )
    features.gradient_scale = scale  # recorded in the report
    return features, projector


def relative_ridge(features: HarvestedFeatures, ridge: float) -> float:
    """Absolute lambda = ``ridge`` x (mean over samples of |J_i|_F^2) / k: the mean eigenvalue of the
    full set's Gauss-Newton matrix, so ``ridge`` is scale-free."""
    J = np.asarray(features.jacobians, dtype=np.float64)
    return float(ridge * (J**2).sum(axis=tuple(range(1, J.ndim))).mean() / features.proj_dim)


# -- 3. from projected solutions to weights ------------------------------------------------------


def back_project(projector: Projector, Z: np.ndarray | torch.Tensor, *, dtype=torch.float64) -> dict:
    """``P^T z`` for every row z of ``Z`` ``(m, k)``: ``{parameter name: (m, *shape)}``.

    The projection is linear, so its transpose is the gradient of ``<P g, z>`` with respect to g.
    """
    Z = torch.as_tensor(np.asarray(Z) if not isinstance(Z, torch.Tensor) else Z).to(dtype)
    if Z.ndim != 2 or Z.shape[1] != projector.k:
        raise ValueError(f"Z must have shape (m, k={projector.k}), got {tuple(Z.shape)}")
    m = Z.shape[0]
    zeros = {n: torch.zeros((m, *s), dtype=dtype, requires_grad=True) for n, s in projector.param_shapes.items()}
    out = projector.project(zeros)
    grads = torch.autograd.grad((out * Z).sum(), list(zeros.values()))
    return {n: g.detach() for n, g in zip(zeros, grads)}


def policy_params_from_solutions(
    actor: torch.nn.Module, projector: Projector, Z: np.ndarray, *, scale: float = 1.0
) -> Iterator[dict]:
    """Yields, per row of ``Z``, the actor weights ``W0 + scale * P^T z`` (a dict for
    ``functional_call``; parameters outside the projection keep their W0 values)."""
    base = {n: p.detach() for n, p in actor.named_parameters()}
    missing = [n for n in projector.names if n not in base]
    if missing:
        raise ValueError(f"the projector's parameters {missing[:5]} are not parameters of the actor")
    for start in range(0, len(Z), 16):  # bounded memory: 16 weight changes at a time
        deltas = back_project(projector, Z[start : start + 16])
        for j in range(len(next(iter(deltas.values())))):
            params = dict(base)
            for n, d in deltas.items():
                params[n] = base[n] + (scale * d[j]).to(base[n].dtype).to(base[n].device)
            yield params


# -- 4. rollouts -----------------------------------------------------------------------------------


def rollout_losses(actor, param_sets, envs, *, episodes: int = 1, seed: int = 0, progress: bool = False):
    """``F`` ``(m, T)``: minus the mean episode return of each parameter set on each env of ``envs``,
    and the success rates ``(m, T)``. ``None`` in ``param_sets`` means the actor's own weights."""
    losses, success = [], []
    iterator = param_sets
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(param_sets, desc="rollouts", unit="policy")
    for params in iterator:
        ret, suc = rollout_returns(actor, envs, episodes=episodes, seed=seed, params=params)
        losses.append(-ret.mean(axis=0))
        success.append(suc.mean(axis=0))
    return np.array(losses), np.array(success)


class PolicyGradEx:
    """GradEx for a SAC snapshot: harvest once, then estimate F^(s) for any subsets by rollouts.

    Args:
        module: a :class:`~lightning_ksm.rl.SACModule` at the snapshot W0 (its replay buffer must
            hold transitions of every source task).
        config: :class:`RLAttributionConfig` (or dict).
        source_tasks, target_tasks: task names (default: all of the module's tasks).
        teacher: the same run's module at a later point (for ``targets="policy"``/``"auto"``).
    """

    def __init__(self, module, config=None, *, source_tasks=None, target_tasks=None, teacher=None) -> None:
        cfg = RLAttributionConfig.from_dict(config) if isinstance(config, dict) else (config or RLAttributionConfig())
        self.cfg = cfg
        self.module = module
        self.source_tasks = _task_positions(module, source_tasks, "source_tasks")
        self.target_tasks = _task_positions(module, target_tasks, "target_tasks")
        cfg.validate(len(self.source_tasks))
        if cfg.targets == "policy" and teacher is None:
            raise ValueError("targets='policy' needs teacher= (the same run's module at a later point)")
        self.teacher = None if cfg.targets == "critic" else teacher
        self.targets = "critic" if self.teacher is None else "policy"
        self.timings: dict = {}
        start = time.perf_counter()
        self.features, self.projector = harvest_policy_features(
            module, tasks=self.source_tasks, n_per_task=cfg.n_per_task, projection=cfg.projection,
            proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed, action_step=cfg.action_step, seed=cfg.seed,
            teacher=self.teacher,
        )
        self.timings["harvest"] = time.perf_counter() - start
        self.lam = relative_ridge(self.features, cfg.ridge)
        self.envs = module.eval_envs(self.target_tasks)
        if cfg.max_episode_steps is not None and cfg.max_episode_steps != self.envs.max_episode_steps:
            if cfg.max_episode_steps > self.envs.max_episode_steps:
                raise ValueError(
                    f"max_episode_steps={cfg.max_episode_steps} exceeds the module's episode length "
                    f"{self.envs.max_episode_steps}"
                )
            self.envs.max_episode_steps = int(cfg.max_episode_steps)
        self.timings.setdefault("gradex", 0.0)
        self.timings.setdefault("rollouts", 0.0)
        self.rollout_steps = 0

    def solve(self, S) -> np.ndarray:
        """GradEx solutions ``Z`` ``(m, k)`` for the subsets ``S`` ``(m, K_source)``."""
        start = time.perf_counter()
        sol = solve_subsets(self.features, S, lam=self.lam, loss="squared", weighting=self.cfg.weighting)
        self.timings["gradex"] += time.perf_counter() - start
        return sol.solutions

    def losses(self, S, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Estimated ``F^`` ``(m, T)`` (T = target tasks) and success rates, by rollouts."""
        Z = self.solve(S)
        start = time.perf_counter()
        params = policy_params_from_solutions(self.module.actor, self.projector, Z)
        F, succ = rollout_losses(self.module.actor, params, self.envs, episodes=self.cfg.episodes,
                                 seed=self.cfg.rollout_seed, progress=progress)
        self.timings["rollouts"] += time.perf_counter() - start
        self.rollout_steps += len(Z) * len(self.envs) * self.envs.max_episode_steps * self.cfg.episodes
        return F, succ

    def linearization_error(self, S=None) -> float:
        """How far the estimated policy leaves the linear regime, on the harvested states.

        For the subset ``S`` (default: all source tasks), ``|a(W0 + P^T z) - (a0 + J z)| / |J z|``
        over every harvested transition and action coordinate: 0 means the rolled-out policy is
        exactly the linearized one GradEx solved for; above ~0.3 the estimate is dominated by
        higher-order effects (lower ``action_step`` or raise ``ridge``).
        """
        S = np.ones((1, len(self.source_tasks)), dtype=bool) if S is None else np.atleast_2d(np.asarray(S, dtype=bool))
        Z = solve_subsets(self.features, S[:1], lam=self.lam, loss="squared", weighting=self.cfg.weighting).solutions
        params = next(policy_params_from_solutions(self.module.actor, self.projector, Z))
        ids = [self.module.task_names.index(n) for n in self.source_tasks]
        idx = self.module.buffer.per_task_indices(self.cfg.n_per_task, ids, seed=self.cfg.seed)
        batch = self.module.buffer.batch(idx, device=self.module.device)
        x = self.module._inputs(batch["obs"], batch["task_ids"])
        with torch.no_grad():
            moved = torch.tanh(torch.func.functional_call(self.module.actor, params, (x,))[0]).cpu().numpy()
        change = np.einsum("nck,k->nc", np.asarray(self.features.jacobians, dtype=np.float64), Z[0])
        linear = np.asarray(self.features.outputs, dtype=np.float64) + change
        denom = np.linalg.norm(change)
        return float(np.linalg.norm(moved - linear) / denom) if denom > 0 else 0.0

    def snapshot_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """F and success of the snapshot policy itself (no update), ``(T,)`` each."""
        F, succ = rollout_losses(self.module.actor, [None], self.envs, episodes=self.cfg.episodes,
                                 seed=self.cfg.rollout_seed)
        return F[0], succ[0]


# -- 5. surrogate and readouts -------------------------------------------------------------------


def top_partners(scores: np.ndarray, task_names: Sequence[str], target_names: Sequence[str], k: int = 3) -> dict:
    """The ``k`` source tasks with the highest scores for every target (the target itself excluded).

    ``scores``: ``(K, T)``, score > 0 = the task helps. Returns ``{target: [(task, score), ...]}``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(task_names), len(target_names)):
        raise ValueError(f"scores must have shape (K, T) = ({len(task_names)}, {len(target_names)}), got {scores.shape}")
    out = {}
    for t, target in enumerate(target_names):
        order = [int(i) for i in np.argsort(-scores[:, t], kind="stable") if task_names[i] != target]
        out[target] = [(task_names[i], float(scores[i, t])) for i in order[:k]]
    return out


def report_from_losses(
    S: np.ndarray,
    F: np.ndarray,
    task_names: Sequence[str],
    target_names: Sequence[str],
    config: AnalysisConfig,
    *,
    top_k: int = 3,
    timings: Optional[dict] = None,
    extra_config: Optional[dict] = None,
    extra_fit: Optional[dict] = None,
) -> AttributionReport:
    """:func:`lightning_ksm.analysis.report_from_losses` on rollout losses, plus the paper's task
    selection: each best-subset entry also lists the ``top_k`` co-training partners of its target
    by ensemble score (``top_partners``, ``top_partner_scores``)."""
    fit = {
        "gradex_loss": "squared (linearized actor update toward target actions); F = -mean episode return by rollouts",
        **(extra_fit or {}),
    }
    report = _report_from_losses(S, F, task_names, target_names, config, timings=timings,
                                 extra_config=extra_config, extra_fit_quality=fit)
    partners = top_partners(report.scores["ensemble"], report.task_names, report.target_names, top_k)
    for entry in report.best_subsets:
        entry["top_partners"] = [p for p, _ in partners[entry["target"]]]
        entry["top_partner_scores"] = [float(v) for _, v in partners[entry["target"]]]
    return report


def attribute_policy(
    module,
    config: RLAttributionConfig | dict | None = None,
    *,
    source_tasks: Optional[Sequence[str]] = None,
    target_tasks: Optional[Sequence[str]] = None,
    teacher=None,
    progress: bool = False,
    estimator: Optional[PolicyGradEx] = None,
) -> AttributionReport:
    """Task attribution of a SAC snapshot: which tasks help which (see the module docstring).

    Targets are every target task plus ``"all"`` (mean over them). Returns an
    :class:`~lightning_ksm.AttributionReport` with one score row per source environment.
    ``teacher``: the same run's module at a later point (target actions, see the module docs).
    ``estimator``: reuse a :class:`PolicyGradEx` built earlier (same module, config and teacher).
    """
    est = estimator or PolicyGradEx(module, config, source_tasks=source_tasks, target_tasks=target_tasks,
                                    teacher=teacher)
    cfg = est.cfg
    K = len(est.source_tasks)
    acfg = cfg.analysis_config(K, lam=est.lam)
    # Distinct subsets whenever there are enough to draw from (rollouts of a repeated subset repeat).
    unique = acfg.n_possible_subsets(K) >= 1.5 * acfg.n_subsets
    S = sample_subsets(K, acfg.n_subsets, p=None if acfg.subset_size else acfg.subset_p, size=acfg.subset_size,
                       seed=acfg.seed, unique=unique)
    F_tasks, success = est.losses(S, progress=progress)
    F = np.concatenate([F_tasks, F_tasks.mean(axis=1, keepdims=True)], axis=1)
    F0, s0 = est.snapshot_losses()
    targets = list(est.target_tasks) + ["all"]
    extra_fit = {
        "snapshot_loss": dict(zip(targets, [float(v) for v in np.append(F0, F0.mean())])),
        "snapshot_success": dict(zip(est.target_tasks, [float(v) for v in s0])),
        "estimated_success_mean": dict(zip(est.target_tasks, [float(v) for v in success.mean(axis=0)])),
        "rollout_env_steps": int(est.rollout_steps),
        "gradex_targets": est.targets,
        "gradex_lambda": est.lam,
        "linearization_error": est.linearization_error(),
    }
    if est.targets == "critic":
        extra_fit["improved_action_gradient_scale"] = float(est.features.gradient_scale)
    extra = {
        "rl": cfg.to_dict(),
        "projection": est.projector.config() | {"params": len(est.projector.names), "d": est.projector.d},
        "sac": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(module.hparams).items()
                if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        "source_tasks": list(est.source_tasks),
        "target_tasks": list(est.target_tasks),
    }
    return report_from_losses(S, F, est.source_tasks, targets, acfg, top_k=cfg.top_k, timings=dict(est.timings),
                              extra_config=extra, extra_fit=extra_fit)
