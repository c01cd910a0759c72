"""Reinforcement learning adapter: multi-task SAC on Meta-World, and task attribution for it.

Needs the ``rl`` extra (``gymnasium``, ``metaworld``) and Lightning; nothing here is imported by
``import lightning_ksm``. Names are imported on first use, so ``lightning_ksm.rl.envs`` (no
Lightning) and the attribution adapter stay importable on their own.

- :class:`SACModule`: the Lightning module (multi-task SAC, manual optimization).
- :class:`MultiTaskEnv`, :func:`make_metaworld_envs`, :data:`MT10_TASKS`: environments.
- :class:`ReplayBuffer`: replay with task ids.
- :func:`evaluate_policy`: mean return and success rate per task.
- :func:`attribute_policy`, :class:`RLAttributionConfig`: the task-attribution adapter
  (replay transitions -> projected policy gradients -> GradEx -> rollouts -> kernel surrogate ->
  :class:`~lightning_ksm.AttributionReport`).
- :class:`RLTaskAttribution`: the Lightning callback that snapshots W0 during ``fit`` and writes
  the report at the end (the RL counterpart of :class:`lightning_ksm.TaskAttribution`).
"""

from importlib import import_module

_EXPORTS = {
    "MT10_TASKS": "envs",
    "known_env_names": "envs",
    "resolve_env_names": "envs",
    "make_metaworld_envs": "envs",
    "MultiTaskEnv": "envs",
    "ReplayBuffer": "buffer",
    "Actor": "networks",
    "TwinCritic": "networks",
    "SACModule": "sac",
    "evaluate_policy": "evaluate",
    "rollout_returns": "evaluate",
    "RLAttributionConfig": "config",
    "attribute_policy": "attribution",
    "harvest_policy_features": "attribution",
    "policy_params_from_solutions": "attribution",
    "rollout_losses": "attribution",
    "report_from_losses": "attribution",
    "top_partners": "attribution",
    "RLTaskAttribution": "callback",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ksm.rl' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
