"""The losses GradEx linearizes, on predictions laid out as (n, C, m): sample, output, subset."""

from __future__ import annotations

import torch

from ..config import LOSSES as _LOSSES

__all__ = ["LOSSES", "LOSS_IMPL", "MODE_TO_LOSS", "default_loss"]

LOSSES = _LOSSES  # the vocabulary is declared in config
MODE_TO_LOSS = {
    "logits": "cross_entropy",
    "margin": "logistic",
    "sequence": "logistic",  # the margin of the mean token loss (harvesting/outputs.py)
    "logistic": "logistic",
    "regression": "squared",
}


class _Logistic:
    """Binary logistic loss softplus(f) - y f on a scalar output (C = 1), labels in {0, 1}."""

    name = "logistic"

    @staticmethod
    def value(P, y):
        # y in {0, 1}: softplus(f) - y f = softplus((1 - 2y) f), one pass fewer
        return torch.nn.functional.softplus((1 - 2 * y) * P)[:, 0]

    @staticmethod
    def grad_and_curv(P, y):
        s = torch.sigmoid(P)
        return s - y, s * (1 - s)

    @staticmethod
    def weighted_curvature(curv, W):
        return curv * W

    @staticmethod
    def hvp(state, U):
        return state * U

    @staticmethod
    def predict_correct(P, y):
        return ((P[:, 0] > 0) == (y[:, 0] > 0.5)).to(P.dtype)


class _Squared:
    """Squared loss 0.5 |f - y|^2 on C >= 1 outputs."""

    name = "squared"

    @staticmethod
    def value(P, y):
        R = P - y
        return 0.5 * (R[:, 0] ** 2 if R.shape[1] == 1 else (R * R).sum(1))

    @staticmethod
    def grad_and_curv(P, y):
        return P - y, None

    @staticmethod
    def weighted_curvature(curv, W):
        return W

    @staticmethod
    def hvp(state, U):
        return state * U

    predict_correct = None


class _CrossEntropy:
    """Softmax cross-entropy on C >= 2 logits, integer labels in [0, C)."""

    name = "cross_entropy"

    @staticmethod
    def value(P, y):
        picked = P.gather(1, y.view(-1, 1, 1).expand(-1, 1, P.shape[2])).squeeze(1)
        return torch.logsumexp(P, dim=1) - picked

    @staticmethod
    def grad_and_curv(P, y):
        p = torch.softmax(P, dim=1)
        g = p.clone()
        g[torch.arange(P.shape[0], device=P.device), y] -= 1.0
        return g, p

    @staticmethod
    def weighted_curvature(p, W):
        return p, p * W

    @staticmethod
    def hvp(state, U):
        p, pW = state
        return pW * (U - (p * U).sum(1, keepdim=True))

    @staticmethod
    def predict_correct(P, y):
        return (P.argmax(1) == y.view(-1, 1)).to(P.dtype)


LOSS_IMPL = {"logistic": _Logistic, "squared": _Squared, "cross_entropy": _CrossEntropy}


def default_loss(mode: str) -> str:
    """The loss GradEx uses for an output mode: logits -> cross_entropy, margin/sequence/logistic ->
    logistic, regression -> squared. ``custom`` has no default (pass ``loss=`` explicitly)."""
    if mode not in MODE_TO_LOSS:
        raise ValueError(
            f"output mode {mode!r} has no default GradEx loss; pass loss= one of {LOSSES}"
        )
    return MODE_TO_LOSS[mode]
