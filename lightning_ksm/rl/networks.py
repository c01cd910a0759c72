"""Actor and twin-critic MLPs of Soft Actor-Critic (plain torch; no Lightning, no gymnasium)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["mlp", "Actor", "TwinCritic"]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """A ReLU MLP ``in_dim -> hidden... -> out_dim``."""
    layers: list = []
    last = in_dim
    for h in hidden:
        layers += [nn.Linear(last, int(h)), nn.ReLU()]
        last = int(h)
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy. ``forward(x)`` returns the pre-tanh mean and log-std.

    ``x`` is the observation with the task one-hot appended. The deterministic action (used for
    evaluation and by the attribution adapter) is ``tanh(mean)``.
    """

    def __init__(self, in_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = mlp(in_dim, hidden, 2 * action_dim)

    def forward(self, x: torch.Tensor):
        mean, log_std = self.net(x).chunk(2, dim=-1)
        # Smoothly squash log-std into [LOG_STD_MIN, LOG_STD_MAX] (no dead gradients at the bounds).
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1.0)
        return mean, log_std

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        """The mean action ``tanh(mean)`` in ``[-1, 1]^action_dim``."""
        return torch.tanh(self.forward(x)[0])

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """A reparameterized action sample and its log-probability (with the tanh correction)."""
        mean, log_std = self.forward(x)
        std = log_std.exp()
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + std * eps
        action = torch.tanh(u)
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
        return action, log_prob


class TwinCritic(nn.Module):
    """Two independent Q-networks ``Q_i(x, a)``; ``forward`` returns both, ``(B,)`` each."""

    def __init__(self, in_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.q1 = mlp(in_dim + action_dim, hidden, 1)
        self.q2 = mlp(in_dim + action_dim, hidden, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor):
        xa = torch.cat([x, a], dim=-1)
        return self.q1(xa).squeeze(-1), self.q2(xa).squeeze(-1)

    def min_q(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The pessimistic value ``min(Q1, Q2)``."""
        q1, q2 = self.forward(x, a)
        return torch.minimum(q1, q2)
