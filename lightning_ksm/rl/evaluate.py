"""Evaluation of a multi-task policy: mean episode return and success rate per task.

The policy acts deterministically (``tanh`` of the Gaussian mean). Every episode runs all tasks in
lockstep for ``max_episode_steps`` steps from a fresh reset; an episode counts as a success when
Meta-World's ``info["success"]`` was 1 at any step (the MT10 convention). With fixed goals (the
default of :func:`~lightning_ksm.rl.envs.make_metaworld_envs`) a deterministic policy gives the same
episode every time, so one episode per task is an exact evaluation; with resampled goals the envs
are reseeded from ``seed`` first, so the same seed gives the same goals.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from torch.func import functional_call

from .envs import MultiTaskEnv

__all__ = ["evaluate_policy", "rollout_returns"]


def rollout_returns(
    actor: torch.nn.Module,
    envs: MultiTaskEnv,
    *,
    episodes: int = 1,
    seed: int = 0,
    params: Optional[Mapping[str, torch.Tensor]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(returns, successes)``, each ``(episodes, n_envs)``, of the deterministic policy.

    ``params`` optionally replaces (some of) the actor's parameters for these rollouts (via
    ``torch.func.functional_call``; the actor itself is not modified).
    """
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
    device = next(actor.parameters()).device
    was_training = actor.training
    actor.eval()
    envs.reseed(seed)
    returns = np.zeros((episodes, len(envs)))
    success = np.zeros((episodes, len(envs)), dtype=bool)
    try:
        with torch.no_grad():
            for ep in range(episodes):
                envs.reset()
                for _ in range(envs.max_episode_steps):
                    x = torch.as_tensor(envs.policy_inputs(), device=device)
                    mean = actor(x)[0] if params is None else functional_call(actor, dict(params), (x,))[0]
                    res = envs.step(torch.tanh(mean).cpu().numpy())
                    returns[ep] += res.rewards
                    success[ep] |= res.success
    finally:
        actor.train(was_training)
    return returns, success


def evaluate_policy(
    actor: torch.nn.Module,
    envs: MultiTaskEnv,
    *,
    episodes: int = 1,
    seed: int = 0,
    params: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict:
    """Per task: ``{"return": mean episode return, "success_rate": fraction of successful episodes,
    "episodes": n}``, keyed by task name, plus ``"mean"`` over the tasks."""
    returns, success = rollout_returns(actor, envs, episodes=episodes, seed=seed, params=params)
    out = {
        name: {"return": float(returns[:, i].mean()), "success_rate": float(success[:, i].mean()), "episodes": episodes}
        for i, name in enumerate(envs.names)
    }
    out["mean"] = {
        "return": float(returns.mean()),
        "success_rate": float(success.mean()),
        "episodes": episodes,
    }
    return out
