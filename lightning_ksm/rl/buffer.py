"""A replay buffer of transitions that keeps each transition's task id.

Observations are stored without the task one-hot (it is rebuilt from the task id when a batch is
sampled), so one buffer serves any number of task slots and a subset of it is a cheap copy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["ReplayBuffer"]

_FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "task_ids")


class ReplayBuffer:
    """A fixed-capacity ring buffer of ``(obs, action, reward, next_obs, terminated, task_id)``.

    Args:
        capacity: maximum number of transitions; the oldest are overwritten.
        obs_dim, action_dim: sizes of one observation (without one-hot) and one action.
        n_tasks: number of task slots; task ids are integers in ``[0, n_tasks)``.
        seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, n_tasks: int, *, seed: int = 0) -> None:
        for name, value in (("capacity", capacity), ("obs_dim", obs_dim), ("action_dim", action_dim), ("n_tasks", n_tasks)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.capacity, self.obs_dim, self.action_dim, self.n_tasks = int(capacity), int(obs_dim), int(action_dim), int(n_tasks)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.task_ids = np.zeros(capacity, dtype=np.int64)
        self.size = 0
        self.pos = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated, task_ids) -> None:
        """Append a batch of B transitions (arrays with leading dim B; ``task_ids`` integers)."""
        task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        B = len(task_ids)
        arrays = {
            "obs": np.asarray(obs, dtype=np.float32).reshape(B, self.obs_dim),
            "actions": np.asarray(actions, dtype=np.float32).reshape(B, self.action_dim),
            "rewards": np.asarray(rewards, dtype=np.float32).reshape(B),
            "next_obs": np.asarray(next_obs, dtype=np.float32).reshape(B, self.obs_dim),
            "terminated": np.asarray(terminated, dtype=bool).reshape(B),
        }
        bad = np.flatnonzero((task_ids < 0) | (task_ids >= self.n_tasks))
        if len(bad):
            raise ValueError(f"task_ids[{bad[0]}] = {task_ids[bad[0]]} is not in [0, {self.n_tasks})")
        idx = (self.pos + np.arange(B)) % self.capacity
        for name, arr in arrays.items():
            getattr(self, name)[idx] = arr
        self.task_ids[idx] = task_ids
        self.pos = int((self.pos + B) % self.capacity)
        self.size = int(min(self.capacity, self.size + B))

    def task_counts(self) -> np.ndarray:
        """Number of stored transitions of every task slot, ``(n_tasks,)``."""
        return np.bincount(self.task_ids[: self.size], minlength=self.n_tasks)

    def _positions(self, tasks) -> np.ndarray:
        if tasks is None:
            return np.arange(self.size)
        tasks = np.asarray(tasks, dtype=np.int64).reshape(-1)
        return np.flatnonzero(np.isin(self.task_ids[: self.size], tasks))

    def sample_indices(self, batch_size: int, *, tasks: Sequence[int] | None = None) -> np.ndarray:
        """Uniform positions of ``batch_size`` stored transitions (only of ``tasks`` when given)."""
        if self.size == 0:
            raise ValueError("the replay buffer is empty: collect transitions before sampling")
        pool = None if tasks is None else self._positions(tasks)
        if pool is not None and len(pool) == 0:
            raise ValueError(f"the replay buffer holds no transition of tasks {[int(t) for t in np.atleast_1d(tasks)]}")
        if pool is None:
            return self.rng.integers(0, self.size, size=batch_size)
        return pool[self.rng.integers(0, len(pool), size=batch_size)]

    def per_task_indices(self, n_per_task: int, tasks: Sequence[int], *, seed: int = 0) -> np.ndarray:
        """``n_per_task`` distinct positions of every task in ``tasks`` (fewer if a task has fewer), by task.

        Uses its own generator (``seed``), so it does not move the training sampler.
        """
        rng = np.random.default_rng(seed)
        out = []
        for t in tasks:
            pool = np.flatnonzero(self.task_ids[: self.size] == int(t))
            if len(pool) == 0:
                raise ValueError(f"the replay buffer holds no transition of task id {int(t)}")
            out.append(np.sort(rng.choice(pool, size=min(n_per_task, len(pool)), replace=False)))
        return np.concatenate(out)

    def batch(self, idx: np.ndarray, device=None) -> dict:
        """The transitions at positions ``idx`` as a dict of torch tensors (task ids included)."""
        return {name: torch.as_tensor(getattr(self, name)[idx], device=device) for name in _FIELDS}

    def sample(self, batch_size: int, *, tasks: Sequence[int] | None = None, device=None) -> dict:
        """A uniform random batch (optionally only of ``tasks``) as a dict of torch tensors."""
        return self.batch(self.sample_indices(batch_size, tasks=tasks), device)

    def select_tasks(self, tasks: Sequence[int]) -> "ReplayBuffer":
        """A new buffer (same capacity and seed state) holding only the transitions of ``tasks``."""
        keep = self._positions(tasks)
        out = ReplayBuffer(self.capacity, self.obs_dim, self.action_dim, self.n_tasks)
        out.rng = np.random.default_rng(self.rng.integers(2**63))
        out.add(self.obs[keep], self.actions[keep], self.rewards[keep], self.next_obs[keep],
                self.terminated[keep], self.task_ids[keep])
        return out

    def state_dict(self) -> dict:
        """The stored transitions (torch tensors, so Lightning checkpoints load with
        ``weights_only=True``), write position and generator state (plain Python)."""
        state = {name: torch.from_numpy(getattr(self, name)[: self.size].copy()) for name in _FIELDS}
        state.update(capacity=self.capacity, pos=self.pos, size=self.size, rng=self.rng.bit_generator.state)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (same dimensions)."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer capacity {self.capacity} differs from the saved {state['capacity']}")
        n = int(state["size"])
        for name in _FIELDS:
            arr = state[name].numpy() if isinstance(state[name], torch.Tensor) else np.asarray(state[name])
            if arr.shape[1:] != getattr(self, name).shape[1:]:
                raise ValueError(f"saved buffer field {name!r} has shape {arr.shape}, expected (*, {getattr(self, name).shape[1:]})")
            getattr(self, name)[:n] = arr
        self.size, self.pos = n, int(state["pos"])
        self.rng.bit_generator.state = state["rng"]
