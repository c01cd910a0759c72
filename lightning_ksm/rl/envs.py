"""Meta-World environments for multi-task RL: name checks, seeded construction, a lockstep runner.

One environment per task, built once and reused for the whole run. Each task's environment is a
goal-observable Meta-World v3 environment (``metaworld.env_dict.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE``;
0.2 s to build, versus ~10 s for the ``gym.make_vec("Meta-World/MT10")`` vector env). Its goal and
object positions are drawn once from its seed and then fixed (Meta-World freezes them after
construction), so the seed of a task decides *which* instance of the task it is. Seeds are derived
from ``(seed, task name)``, never from a task's position, so a task is the same instance whether it
is trained in the full set or in any subset.

:class:`MultiTaskEnv` steps all its environments in lockstep, counts episode steps itself, marks
truncation at ``max_episode_steps`` (Meta-World raises if stepped past its own 500-step limit) and
resets truncated environments automatically, keeping the true final observation for the replay buffer.

``gymnasium`` and ``metaworld`` are imported only here, when environments are built or names are
checked, so ``import lightning_ksm`` never needs them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..harvesting.projection import stable_seed

__all__ = [
    "MT10_TASKS",
    "known_env_names",
    "resolve_env_names",
    "make_metaworld_envs",
    "task_seed",
    "MultiTaskEnv",
    "StepResult",
    "with_task_onehot",
]

# The ten MT10 tasks of Meta-World v3, in the benchmark's order.
MT10_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
_SUFFIX = "-goal-observable"


def _metaworld_dict():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
    except ImportError as exc:  # pragma: no cover - exercised only without the rl extra
        raise ImportError(
            "lightning_ksm.rl needs gymnasium and metaworld: pip install 'lightning-ksm[rl]'"
        ) from exc
    return ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE


def known_env_names() -> list[str]:
    """Every Meta-World v3 environment name this module can build (e.g. ``"reach-v3"``), sorted."""
    return sorted(k[: -len(_SUFFIX)] for k in _metaworld_dict())


def resolve_env_names(names) -> list[str]:
    """Check and normalize task names; raises before anything is built.

    ``names``: ``"mt10"`` (the ten MT10 tasks), one name, or a sequence of names. A name may carry
    the ``"-goal-observable"`` suffix. Raises ``ValueError`` for an empty list, duplicates or unknown
    names (listing the known ones), ``TypeError`` for non-strings.
    """
    if isinstance(names, str):
        names = list(MT10_TASKS) if names.lower() == "mt10" else [names]
    if not isinstance(names, (Sequence, np.ndarray)):
        raise TypeError(f"env names must be 'mt10', a name or a list of names, got {type(names).__name__}")
    names = list(names)
    if not names:
        raise ValueError("the task subset has no environments: pass at least one Meta-World environment name")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"env names[{i}] must be a string, got {type(name).__name__} {name!r}")
        out.append(name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name)
    known = set(known_env_names())
    unknown = [n for n in out if n not in known]
    if unknown:
        raise ValueError(
            f"unknown Meta-World environment name(s) {unknown}; known names: {sorted(known)} "
            f"(or 'mt10' for {list(MT10_TASKS)})"
        )
    seen: dict = {}
    for i, n in enumerate(out):
        if n in seen:
            raise ValueError(f"env name {n!r} is listed twice (positions {seen[n]} and {i}); names must be unique")
        seen[n] = i
    return out


def task_seed(seed: int, name: str) -> int:
    """The construction seed of task ``name`` under run seed ``seed`` (independent of task order)."""
    return int(stable_seed("metaworld-task", int(seed), str(name)) % (2**31 - 1))


def make_metaworld_envs(names, *, seed: int = 0, resample_goals: bool = False) -> dict:
    """Build one goal-observable Meta-World environment per task name: ``{name: env}``.

    Names are checked first (:func:`resolve_env_names`). ``seed`` fixes each task's goal (see the
    module docstring). ``resample_goals=True`` draws a new goal from the env's seeded generator at
    every reset instead (the 50-variation flavour of MT10); by default the goal stays fixed.
    """
    names = resolve_env_names(names)
    table = _metaworld_dict()
    envs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32/float64 casting notices from gymnasium
        for name in names:
            env = table[name + _SUFFIX](seed=task_seed(seed, name))
            if resample_goals:
                env._freeze_rand_vec = False
                env.seeded_rand_vec = True
            envs[name] = env
    return envs


def with_task_onehot(obs: np.ndarray, task_ids: np.ndarray, n_slots: int) -> np.ndarray:
    """Observations with the task one-hot appended, as MT10 does: ``(B, obs_dim + n_slots)`` float32."""
    obs = np.asarray(obs, dtype=np.float32)
    onehot = np.zeros((obs.shape[0], n_slots), dtype=np.float32)
    onehot[np.arange(obs.shape[0]), np.asarray(task_ids, dtype=np.int64)] = 1.0
    return np.concatenate([obs, onehot], axis=1)


@dataclass
class StepResult:
    """One lockstep step of every environment (arrays of length n_envs).

    ``next_obs`` is the true next observation (the final one when an episode ended: store it in the
    replay buffer); ``terminated`` is a real terminal (bootstrapping stops), ``truncated`` a time
    limit (bootstrapping continues); ``success`` is Meta-World's ``info["success"]``.
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray


class MultiTaskEnv:
    """Environments of several tasks stepped in lockstep, with auto-reset at a step limit.

    Args:
        envs: ``{task name: gymnasium-style env}`` (e.g. from :func:`make_metaworld_envs`). All must
            share one observation shape and one action shape (checked here, before any step).
        task_ids: the global task index of each env (its one-hot position); default ``0..n-1``.
        n_task_slots: length of the task one-hot; default ``max(task_ids) + 1``.
        max_episode_steps: truncate episodes after this many steps (default: the envs' own
            ``max_path_length``, else 500). Never above an env's own limit.
        seed: reseeds every env's generator at construction (matters only with resampled goals).

    Attributes: ``names``, ``task_ids``, ``obs`` (current observations, ``(n, obs_dim)``),
    ``episode_steps``, ``episode_returns`` and ``finished`` (list of ``(task name, return, success)``
    of completed episodes, newest last).
    """

    def __init__(
        self,
        envs: Mapping,
        *,
        task_ids: Sequence[int] | None = None,
        n_task_slots: int | None = None,
        max_episode_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(envs, Mapping):
            raise TypeError(f"envs must be a dict task name -> env, got {type(envs).__name__}")
        if not envs:
            raise ValueError("the task subset has no environments: envs is empty")
        self.names = [str(n) for n in envs]
        self.envs = list(envs.values())
        first = self.envs[0]
        obs_shape, act_shape = tuple(first.observation_space.shape), tuple(first.action_space.shape)
        for name, env in zip(self.names, self.envs):
            if tuple(env.observation_space.shape) != obs_shape:
                raise ValueError(
                    f"environment {name!r} has observation shape {tuple(env.observation_space.shape)} but "
                    f"{self.names[0]!r} has {obs_shape}; all tasks must share one observation space"
                )
            if tuple(env.action_space.shape) != act_shape:
                raise ValueError(
                    f"environment {name!r} has action shape {tuple(env.action_space.shape)} but "
                    f"{self.names[0]!r} has {act_shape}; all tasks must share one action space"
                )
        if len(obs_shape) != 1 or len(act_shape) != 1:
            raise ValueError(f"observations and actions must be flat vectors, got shapes {obs_shape} and {act_shape}")
        self.obs_dim, self.action_dim = obs_shape[0], act_shape[0]
        n = len(self.envs)
        self.task_ids = np.arange(n) if task_ids is None else np.asarray(task_ids, dtype=np.int64)
        if self.task_ids.shape != (n,) or (self.task_ids < 0).any():
            raise ValueError(f"task_ids must hold {n} non-negative integers (one per env), got {task_ids!r}")
        self.n_task_slots = int(self.task_ids.max()) + 1 if n_task_slots is None else int(n_task_slots)
        if self.task_ids.max() >= self.n_task_slots:
            raise ValueError(f"task_ids {self.task_ids.tolist()} do not fit in n_task_slots={self.n_task_slots}")
        limits = [int(getattr(env, "max_path_length", 500)) for env in self.envs]
        limit = min(limits)
        if max_episode_steps is None:
            max_episode_steps = limit
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive integer, got {max_episode_steps!r}")
        if max_episode_steps > limit:
            raise ValueError(
                f"max_episode_steps={max_episode_steps} exceeds the environments' own limit of {limit} steps"
            )
        self.max_episode_steps = int(max_episode_steps)
        self.low = np.asarray(first.action_space.low, dtype=np.float32)
        self.high = np.asarray(first.action_space.high, dtype=np.float32)
        self.reseed(seed)
        self.finished: list = []
        self.obs = self.reset()

    def __len__(self) -> int:
        return len(self.envs)

    def reseed(self, seed: int) -> None:
        """Reseed every env's generator from ``(seed, task name)`` (goals already fixed stay fixed)."""
        for name, env in zip(self.names, self.envs):
            if hasattr(env, "seed"):
                env.seed(task_seed(seed, name))

    def reset(self) -> np.ndarray:
        """Reset every environment; returns observations ``(n, obs_dim)``."""
        obs = [self._reset_one(i) for i in range(len(self.envs))]
        self.episode_steps = np.zeros(len(self.envs), dtype=np.int64)
        self.episode_returns = np.zeros(len(self.envs))
        self.episode_success = np.zeros(len(self.envs), dtype=bool)
        self.obs = np.stack(obs)
        return self.obs

    def _reset_one(self, i: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, _ = self.envs[i].reset()
        return np.asarray(obs, dtype=np.float64)

    def policy_inputs(self, obs: np.ndarray | None = None) -> np.ndarray:
        """Observations (default: the current ones) with each env's task one-hot appended."""
        return with_task_onehot(self.obs if obs is None else obs, self.task_ids, self.n_task_slots)

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with ``actions`` ``(n, action_dim)`` (clipped to the action box).

        Episodes that reach ``max_episode_steps`` (or end on their own) are recorded in
        ``finished`` and reset; ``self.obs`` then holds the first observation of the new episode.
        """
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (len(self.envs), self.action_dim):
            raise ValueError(f"actions must have shape ({len(self.envs)}, {self.action_dim}), got {actions.shape}")
        actions = np.clip(actions, self.low, self.high)
        n = len(self.envs)
        next_obs = np.empty((n, self.obs_dim))
        rewards = np.empty(n)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        obs = self.obs.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, env in enumerate(self.envs):
                o, r, term, trunc, info = env.step(actions[i])
                next_obs[i], rewards[i] = o, float(r)
                terminated[i] = bool(term)
                success[i] = bool(info.get("success", False)) if isinstance(info, dict) else False
                self.episode_steps[i] += 1
                truncated[i] = bool(trunc) or self.episode_steps[i] >= self.max_episode_steps
        self.episode_returns += rewards
        self.episode_success |= success
        self.obs = next_obs.copy()
        for i in np.flatnonzero(terminated | truncated):
            self.finished.append((self.names[i], float(self.episode_returns[i]), bool(self.episode_success[i])))
            self.obs[i] = self._reset_one(i)
            self.episode_steps[i] = 0
            self.episode_returns[i] = 0.0
            self.episode_success[i] = False
        return StepResult(obs, actions, rewards, next_obs, terminated, truncated & ~terminated, success)

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()
