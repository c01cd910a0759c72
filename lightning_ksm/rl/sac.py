"""Multi-task Soft Actor-Critic as a Lightning module (manual optimization).

The standard MT-SAC recipe of Meta-World MT10: one policy and one twin critic shared by all tasks,
the task one-hot appended to the observation, one environment per task stepped in lockstep, a
replay buffer that keeps task ids, and a per-task entropy temperature tuned automatically toward the
target entropy ``-action_dim``.

Every training iteration (one item of the module's own ``train_dataloader``) steps each active
task's environment once and then runs ``updates_per_step`` SAC updates: critic (clipped double-Q
target with entropy bonus), actor, temperature, and a Polyak update of the target critic. The
length of a ``fit`` is the number of iterations (``steps``), not ``Trainer(max_steps=...)``:
with three manually stepped optimizers, Lightning's ``global_step`` counts optimizer steps.

Training on a subset of the tasks keeps the one-hot layout of the full task list
(``active_tasks``), so the same network (and a snapshot W0 of it) serves every subset.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Sequence

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .buffer import ReplayBuffer
from .envs import MultiTaskEnv, make_metaworld_envs, resolve_env_names, with_task_onehot
from .networks import Actor, TwinCritic

__all__ = ["SACModule"]


class _Iterations(Dataset):
    """``n`` dummy items: one per training iteration (the data come from the environments)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _check_names(names, what: str) -> list:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(f"{what} is empty: the task subset has no environments")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(n).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} contains duplicates: {names}")
    return names


class SACModule(L.LightningModule):
    """Multi-task SAC over Meta-World tasks (or any envs from ``env_factory``).

    Args:
        tasks: every task of the run (``"mt10"`` or a list of Meta-World names); fixes the one-hot
            layout. Names are checked here, before anything is built.
        active_tasks: the tasks collected and trained on (default: all); a subset of ``tasks``.
        hidden: hidden layer sizes of the actor and of each critic.
        batch_size, lr, gamma, tau: SAC settings (tau: Polyak rate of the target critic).
        buffer_size: replay capacity (transitions, over all tasks).
        steps: training iterations per ``trainer.fit`` (each steps every active env once).
        warmup_steps: iterations with uniformly random actions and no updates at the start.
        updates_per_step: SAC updates per iteration.
        reward_scale: rewards are multiplied by this in the critic target (Meta-World gives 0-10 per step).
        init_alpha: initial entropy temperature of every task; target_entropy: default ``-action_dim``.
        max_episode_steps: episode length (truncation; Meta-World's own limit is 500).
        obs_dim: observation size without the one-hot (39 for Meta-World); checked against the envs.
        seed: network initialization, exploration and replay sampling; env_seed: task instances.
        env_factory: ``fn(names, seed) -> {name: env}``; default :func:`make_metaworld_envs`.
        log_every: log losses every this many iterations.
    """

    def __init__(
        self,
        tasks="mt10",
        *,
        active_tasks: Optional[Sequence[str]] = None,
        hidden: Sequence[int] = (256, 256),
        batch_size: int = 256,
        lr: float = 3e-4,
        gamma: float = 0.99,
        tau: float = 0.005,
        buffer_size: int = 1_000_000,
        steps: int = 10_000,
        warmup_steps: int = 1_000,
        updates_per_step: int = 1,
        reward_scale: float = 1.0,
        init_alpha: float = 1.0,
        target_entropy: Optional[float] = None,
        max_episode_steps: int = 500,
        obs_dim: int = 39,
        action_dim: int = 4,
        seed: int = 0,
        env_seed: int = 0,
        resample_goals: bool = False,
        env_factory: Optional[Callable] = None,
        log_every: int = 100,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.env_factory = env_factory
        names = resolve_env_names(tasks) if env_factory is None else _check_names(tasks, "tasks")
        self.task_names = names
        self._set_active(active_tasks)
        for key, value in (("batch_size", batch_size), ("buffer_size", buffer_size), ("steps", steps),
                           ("updates_per_step", updates_per_step), ("max_episode_steps", max_episode_steps),
                           ("obs_dim", obs_dim), ("action_dim", action_dim), ("log_every", log_every)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not 0 < gamma < 1 or not 0 < tau <= 1 or lr <= 0 or init_alpha <= 0 or reward_scale <= 0:
            raise ValueError(
                f"need 0 < gamma < 1, 0 < tau <= 1 and lr, init_alpha, reward_scale > 0; got gamma={gamma}, "
                f"tau={tau}, lr={lr}, init_alpha={init_alpha}, reward_scale={reward_scale}"
            )
        self.save_hyperparameters(ignore=["env_factory"])
        K = len(self.task_names)
        in_dim = obs_dim + K
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(in_dim, action_dim, hidden)
            self.critic = TwinCritic(in_dim, action_dim, hidden)
        self.critic_target = copy.deepcopy(self.critic)
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.nn.Parameter(torch.full((K,), float(np.log(init_alpha))))
        self.target_entropy = float(-action_dim if target_entropy is None else target_entropy)
        self.buffer = ReplayBuffer(buffer_size, obs_dim, action_dim, K, seed=seed)
        self._explore_rng = np.random.default_rng([seed, 1])
        self._noise = torch.Generator().manual_seed(int(seed) * 7919 + 1)
        self.iterations = 0  # training iterations done (over every fit)
        self.updates = 0
        self._train_envs: Optional[MultiTaskEnv] = None
        self._eval_envs: dict = {}
        self._own_optimizers = None
        self._pending_optim_state = None
        self.last_stats: dict = {}
        self.timing = {"collect_s": 0.0, "update_s": 0.0}

    # -- tasks ------------------------------------------------------------------------------------
    def _set_active(self, active_tasks) -> None:
        if active_tasks is None:
            active = list(self.task_names)
        else:
            active = _check_names(active_tasks, "active_tasks")
            if self.env_factory is None:
                active = resolve_env_names(active)
            unknown = [n for n in active if n not in self.task_names]
            if unknown:
                raise ValueError(f"active_tasks {unknown} are not among the run's tasks {self.task_names}")
        self.active_tasks = [n for n in self.task_names if n in active]
        self.active_ids = np.array([self.task_names.index(n) for n in self.active_tasks], dtype=np.int64)

    def set_active_tasks(self, active_tasks: Optional[Sequence[str]]) -> None:
        """Train on these tasks from now on (the training envs are rebuilt on the next step)."""
        self._set_active(active_tasks)
        self._train_envs = None

    def _build_envs(self, names: list) -> MultiTaskEnv:
        hp = self.hparams
        if self.env_factory is None:
            envs = make_metaworld_envs(names, seed=hp.env_seed, resample_goals=hp.resample_goals)
        else:
            envs = self.env_factory(list(names), hp.env_seed)
        runner = MultiTaskEnv(
            envs, task_ids=[self.task_names.index(n) for n in names], n_task_slots=len(self.task_names),
            max_episode_steps=hp.max_episode_steps, seed=hp.env_seed,
        )
        if runner.obs_dim != hp.obs_dim or runner.action_dim != hp.action_dim:
            raise ValueError(
                f"the environments have observation size {runner.obs_dim} and action size {runner.action_dim}, "
                f"but the module was built for obs_dim={hp.obs_dim}, action_dim={hp.action_dim}"
            )
        return runner

    @property
    def train_envs(self) -> MultiTaskEnv:
        """The active tasks' environments (built once, on first use)."""
        if self._train_envs is None:
            self._train_envs = self._build_envs(self.active_tasks)
        return self._train_envs

    def eval_envs(self, tasks: Optional[Sequence[str]] = None) -> MultiTaskEnv:
        """Separate evaluation environments of ``tasks`` (default all), built once and cached."""
        names = list(self.task_names) if tasks is None else _check_names(tasks, "tasks")
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise ValueError(f"evaluation tasks {unknown} are not among the run's tasks {self.task_names}")
        key = tuple(names)
        if key not in self._eval_envs:
            self._eval_envs[key] = self._build_envs(names)
        return self._eval_envs[key]

    # -- Lightning plumbing -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Iterations(int(self.hparams.steps)), batch_size=None, shuffle=False)

    def configure_optimizers(self):
        hp = self.hparams
        opts = [
            torch.optim.Adam(self.actor.parameters(), lr=hp.lr),
            torch.optim.Adam(self.critic.parameters(), lr=hp.lr),
            torch.optim.Adam([self.log_alpha], lr=hp.lr),
        ]
        if self._pending_optim_state is not None:  # continuing from a snapshot
            for opt, state in zip(opts, self._pending_optim_state):
                opt.load_state_dict(state)
            self._pending_optim_state = None
        return opts

    def _optimizers(self):
        if self._trainer is not None:
            return self.optimizers()  # LightningOptimizers: precision and strategy hooks apply
        if self._own_optimizers is None:  # used outside a Trainer (tests, scripts)
            self._own_optimizers = self.configure_optimizers()
        return self._own_optimizers

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        t0 = time.perf_counter()
        self.collect(random=self.iterations < hp.warmup_steps)
        t1 = time.perf_counter()
        self.timing["collect_s"] += t1 - t0
        if self.iterations >= hp.warmup_steps and len(self.buffer) >= hp.batch_size:
            for _ in range(hp.updates_per_step):
                self.last_stats = self.update(self.sample_batch())
        self.timing["update_s"] += time.perf_counter() - t1
        self.iterations += 1
        if self.last_stats and self.iterations % hp.log_every == 0:
            self.log_dict({f"train/{k}": v for k, v in self.last_stats.items()}, on_step=True, prog_bar=False)
            done = self.train_envs.finished[-len(self.active_tasks):]
            if done:
                self.log("train/episode_return", float(np.mean([r for _, r, _ in done])), on_step=True)
        return None

    # -- acting and learning ----------------------------------------------------------------------
    def policy_input(self, obs, task_ids) -> torch.Tensor:
        """Observations with their task one-hot, as a float tensor on the module's device."""
        x = with_task_onehot(np.asarray(obs), np.asarray(task_ids), len(self.task_names))
        return torch.as_tensor(x, device=self.device)

    def _inputs(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(task_ids.long(), len(self.task_names)).to(obs.dtype)
        return torch.cat([obs, onehot], dim=-1)

    def _generator(self) -> Optional[torch.Generator]:
        # The seeded generator lives on the CPU; on an accelerator the global generator is used.
        return self._noise if self.device.type == "cpu" else None

    @torch.no_grad()
    def act(self, obs, task_ids, *, deterministic: bool = False) -> np.ndarray:
        """Actions ``(B, action_dim)`` for raw observations and task ids."""
        x = self.policy_input(obs, task_ids)
        if deterministic:
            a = self.actor.deterministic(x)
        else:
            a, _ = self.actor.sample(x, generator=self._generator())
        return a.cpu().numpy()

    def collect(self, *, random: bool = False) -> None:
        """Step every active task's environment once and store the transitions."""
        envs = self.train_envs
        if random:
            actions = self._explore_rng.uniform(envs.low, envs.high, size=(len(envs), envs.action_dim))
        else:
            actions = self.act(envs.obs, envs.task_ids)
        res = envs.step(actions)
        self.buffer.add(res.obs, res.actions, res.rewards, res.next_obs, res.terminated, envs.task_ids)

    def sample_batch(self) -> dict:
        """A replay batch of the active tasks."""
        return self.buffer.sample(self.hparams.batch_size, tasks=self.active_ids, device=self.device)

    def critic_loss(self, batch: dict) -> torch.Tensor:
        """Clipped double-Q soft Bellman error on ``batch`` (target critic, current actor and alpha)."""
        hp = self.hparams
        x = self._inputs(batch["obs"], batch["task_ids"])
        x_next = self._inputs(batch["next_obs"], batch["task_ids"])
        alpha = self.log_alpha.detach().exp()[batch["task_ids"]]
        with torch.no_grad():
            a_next, logp_next = self.actor.sample(x_next, generator=self._generator())
            q_next = self.critic_target.min_q(x_next, a_next) - alpha * logp_next
            not_done = 1.0 - batch["terminated"].float()
            target = hp.reward_scale * batch["rewards"] + hp.gamma * not_done * q_next
        q1, q2 = self.critic(x, batch["actions"])
        return 0.5 * ((q1 - target).pow(2).mean() + (q2 - target).pow(2).mean())

    def update(self, batch: dict) -> dict:
        """One SAC update (critic, actor, temperature, target critic) on ``batch``; returns the losses."""
        hp = self.hparams
        opt_actor, opt_critic, opt_alpha = self._optimizers()
        critic_loss = self.critic_loss(batch)
        opt_critic.zero_grad(set_to_none=True)
        self._backward(critic_loss)
        opt_critic.step()

        x = self._inputs(batch["obs"], batch["task_ids"])
        tid = batch["task_ids"]
        self.critic.requires_grad_(False)  # the actor loss must not leave gradients in the critic
        a, logp = self.actor.sample(x, generator=self._generator())
        alpha = self.log_alpha.detach().exp()[tid]
        actor_loss = (alpha * logp - self.critic.min_q(x, a)).mean()
        opt_actor.zero_grad(set_to_none=True)
        self._backward(actor_loss)
        opt_actor.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.log_alpha[tid] * (logp.detach() + self.target_entropy)).mean()
        opt_alpha.zero_grad(set_to_none=True)
        self._backward(alpha_loss)
        opt_alpha.step()

        with torch.no_grad():
            for p, pt in zip(self.critic.parameters(), self.critic_target.parameters()):
                pt.lerp_(p, hp.tau)
        self.updates += 1
        return {
            "critic_loss": float(critic_loss.detach()),
            "actor_loss": float(actor_loss.detach()),
            "alpha_loss": float(alpha_loss.detach()),
            "alpha": float(self.log_alpha.detach().exp().mean()),
            "entropy": float(-logp.detach().mean()),
        }

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, tasks: Optional[Sequence[str]] = None, *, episodes: int = 1, seed: int = 0) -> dict:
        """Mean return and success rate of the deterministic policy per task (see :func:`evaluate_policy`)."""
        from .evaluate import evaluate_policy

        return evaluate_policy(self.actor, self.eval_envs(tasks), episodes=episodes, seed=seed)

    # -- checkpoints and snapshots ----------------------------------------------------------------
    def _run_state(self) -> dict:
        return {
            "buffer": self.buffer.state_dict(),
            "iterations": self.iterations,
            "updates": self.updates,
            "explore_rng": self._explore_rng.bit_generator.state,
            "noise": self._noise.get_state(),
        }

    def _load_run_state(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.iterations, self.updates = int(state["iterations"]), int(state["updates"])
        self._explore_rng.bit_generator.state = state["explore_rng"]
        self._noise.set_state(state["noise"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning checkpoints also carry the replay buffer, counters and generator states."""
        checkpoint["sac_run_state"] = self._run_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sac_run_state" in checkpoint:
            self._load_run_state(checkpoint["sac_run_state"])

    def snapshot(self) -> dict:
        """Everything needed to continue training from here: weights, optimizer states, replay
        buffer, counters and generator states (a plain dict; save it with ``torch.save``)."""
        hp = dict(self.hparams)
        hp["tasks"] = list(self.task_names)
        hp["active_tasks"] = list(self.active_tasks)
        opts = self._optimizers() if (self._trainer is not None or self._own_optimizers is not None) else None
        return {
            "hparams": hp,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "optimizers": None if opts is None else [copy.deepcopy(getattr(o, "optimizer", o).state_dict()) for o in opts],
            **self._run_state(),
        }

    @classmethod
    def from_snapshot(cls, snap: dict, *, env_factory: Optional[Callable] = None, **overrides) -> "SACModule":
        """A module that continues from :meth:`snapshot` (``overrides`` replace hyperparameters,
        e.g. ``active_tasks`` to train on a subset, ``steps``, ``seed``)."""
        hp = dict(snap["hparams"])
        unknown = sorted(set(overrides) - set(hp))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown}; known: {sorted(hp)}")
        hp.update(overrides)
        module = cls(**hp, env_factory=env_factory)
        module.load_state_dict(snap["state_dict"])
        if "seed" in overrides:  # a new seed re-draws the sampling and exploration streams
            explore, noise = module._explore_rng.bit_generator.state, module._noise.get_state()
            module._load_run_state(snap)
            module._explore_rng.bit_generator.state = explore
            module._noise.set_state(noise)
            module.buffer.rng = np.random.default_rng([int(hp["seed"]), 2])
        else:
            module._load_run_state(snap)
        # A copy: torch's Optimizer.load_state_dict keeps the given moment tensors and Adam then
        # updates them in place, so without it every run from one snapshot would change the next.
        module._pending_optim_state = copy.deepcopy(snap["optimizers"])
        return module
