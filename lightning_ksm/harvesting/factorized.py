"""The factorized projection: projected per-sample gradients from one batched backward pass.

For a layer whose weight gradient is a sum over positions of outer products, the per-sample
gradient of ``nn.Linear`` is ``G = sum_l delta_l a_l^T`` (``a``: the layer's input, ``delta``: the
gradient of the per-sample output with respect to the layer's output). With two small seeded
matrices ``P_r`` (k_r x rows) and ``P_c`` (k_c x cols), the projection ``P_r G P_c^T =
sum_l (P_r delta_l)(P_c a_l)^T`` is formed from the activations and output gradients of one
ordinary backward pass over the batch: the d-sized per-sample gradient never exists (the LoGra
idea; Bergson and LogIX harvest this way).

:class:`FactorizedProjector` is an ordinary :class:`~lightning_ksm.harvesting.projection.Projector`
(``project(grads)`` applies the same linear map to full gradients, which is how the fast path is
tested), shape-based and seeded per parameter name, so it is identical in every process and rank.
Each parameter gets its own block of the output (the output dimension is the sum of the blocks):

- a parameter with >= 2 dims ``(rows, *rest)`` is a matrix ``rows x prod(rest)``, projected to
  ``k_r x k_c`` with ``k_r = min(rows, s)``, ``k_c = min(cols, s)``, ``s = ceil(sqrt(k))``;
- a 1-dim parameter of size d is projected by a dense Gaussian ``min(d, k) x d``;
- a parameter with at most ``k`` entries is kept exactly (no projection).

:class:`FactorizedEngine` computes the projected gradients with the layer hooks of :mod:`.hooks`
(which layers are covered, and the per-sample fallback for the rest, are described there).

``projection="auto"`` takes it for convolution-heavy models, where it was measured at least as
faithful as an SJLT of the exact per-sample gradients against real retraining (torchvision's
ResNet-18, a pre-registered test) and 30x faster to harvest; elsewhere it is opt-in, since on the
modular transformers it was measured less faithful than the sketches (docs/gradex.md).
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch

from .hooks import HookEngine, covered_parameters
from .projection import DEFAULT_CACHE_BYTES, Projector, stable_seed

__all__ = ["FactorizedProjector", "FactorizedEngine", "covered_parameters"]


class FactorizedProjector(Projector):
    """Per-parameter Kronecker-factored Gaussian projection (see the module docstring).

    ``k`` is the budget per parameter; the projector's output dimension ``self.k`` is the sum of
    the parameters' blocks (``blocks_dim``).
    """

    kind = "factorized"

    def __init__(self, param_shapes, k: int, seed: int = 0, *, block_size=None, cache_bytes=DEFAULT_CACHE_BYTES):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (the projection budget per parameter) must be a positive int, got {k!r}")
        self.k_param = k
        super().__init__(param_shapes, k, seed, block_size=1, cache_bytes=cache_bytes)
        side = math.isqrt(k - 1) + 1  # ceil(sqrt(k))
        self.plan: dict[str, tuple] = {}
        offset = 0
        for name, shape in self.param_shapes.items():
            numel = self.numels[name]
            if numel <= k:
                plan = ("exact", numel)
            elif len(shape) >= 2:
                rows, cols = shape[0], numel // shape[0]
                plan = ("matrix", min(rows, side), min(cols, side), rows, cols)
            else:
                plan = ("dense", min(numel, k), numel)
            dim = plan[1] if plan[0] in ("exact", "dense") else plan[1] * plan[2]
            self.plan[name] = plan + (offset, dim)
            offset += dim
        self.k = offset  # the output dimension: every parameter's block

    def _extra_config(self) -> dict:
        return {"k_param": self.k_param}

    def preconditioned(self, scale: Mapping[str, torch.Tensor]) -> "FactorizedProjector":
        """The same projection of ``scale * grad`` (elementwise, e.g. the watched Adam's
        ``1 / sqrt(sqrt(v_hat) + eps)``), with the scale of a matrix parameter replaced by its
        rank-one (Adafactor-style) approximation ``outer(row means, column means) / mean``, so that
        it folds into the two factors and the fast path still never forms a per-sample gradient.
        Exact and dense blocks are scaled exactly."""
        out = copy.copy(self)
        out._cache = {}
        out._scales = {}
        for name, plan in self.plan.items():
            sc = scale[name].detach().to(torch.float64).reshape(-1)
            if plan[0] == "matrix":
                m = sc.reshape(plan[3], plan[4])
                mean = m.mean().clamp_min(1e-30)
                out._scales[name] = (m.mean(1) / mean.sqrt(), m.mean(0) / mean.sqrt())
            else:
                out._scales[name] = sc
        return out

    def with_scale(self, scale: Mapping[str, torch.Tensor]) -> "FactorizedProjector":
        return self.preconditioned(scale)

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("block_size", None)
        return cfg

    def _gaussian(self, name: str, part: str, rows: int, cols: int, device, dtype) -> torch.Tensor:
        def make():
            g = torch.Generator(device="cpu")
            g.manual_seed(stable_seed(self.kind, self.seed, name, part))
            return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)

        return self._cached((name, part), make).to(device=device, dtype=dtype)

    def effective_scale(self) -> dict | None:
        """``{name: scale}`` as this projection applies it (rank-one for matrices), or None."""
        scales = getattr(self, "_scales", None)
        if not scales:
            return None
        out = {}
        for name, shape in self.param_shapes.items():
            sc = scales[name]
            out[name] = (torch.outer(*sc) if isinstance(sc, tuple) else sc).reshape(shape).float()
        return out

    def factors(self, name: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_r, P_c)`` of a matrix parameter (times its scale factors when preconditioned)."""
        _, k_r, k_c, rows, cols, _, _ = self.plan[name]
        P_r = self._gaussian(name, "rows", k_r, rows, device, dtype)
        P_c = self._gaussian(name, "cols", k_c, cols, device, dtype)
        scales = getattr(self, "_scales", None)
        if scales:
            r, c = scales[name]
            P_r, P_c = P_r * r.to(P_r)[None, :], P_c * c.to(P_c)[None, :]
        return P_r, P_c

    def project_param(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Project full per-sample gradients ``(n, *shape)`` of one parameter to ``(n, dim)``."""
        plan = self.plan[name]
        n = grad.shape[0]
        scales = getattr(self, "_scales", None)
        if scales and plan[0] != "matrix":
            grad = grad * scales[name].to(grad).reshape(grad.shape[1:])
        if plan[0] == "exact":
            return grad.reshape(n, -1)
        if plan[0] == "dense":
            P = self._gaussian(name, "dense", plan[1], plan[2], grad.device, grad.dtype)
            return grad.reshape(n, -1) @ P.T
        P_r, P_c = self.factors(name, grad.device, grad.dtype)
        G = grad.reshape(n, plan[3], plan[4])
        return (P_r @ G @ P_c.T).reshape(n, -1)

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lead, rows, dtype, device = self._check_grads(grads)
        parts = [self.project_param(name, grads[name].reshape(rows, *shape).to(dtype))
                 for name, shape in self.param_shapes.items()]
        return torch.cat(parts, dim=1).reshape(*lead, self.k)

    def subset(self, names) -> "FactorizedProjector":
        """The same maps for a subset of the parameters (each block is seeded by its name alone)."""
        out = FactorizedProjector({n: self.param_shapes[n] for n in names}, self.k_param, self.seed,
                                  cache_bytes=self.cache_bytes)
        if getattr(self, "_scales", None):
            out._scales = {n: self._scales[n] for n in names}
        return out


class FactorizedEngine(HookEngine):
    """The harvest engine of a :class:`FactorizedProjector`: the layer hooks of :mod:`.hooks`, with
    both sides of every outer product projected before they meet."""

    what = "factorized projection"
    remedy = "Use projection='sjlt' (per-sample gradients), or exclude= this parameter"

    def _full(self, name, grad):
        return self.projector.project_param(name, grad)

    def _outer(self, name, left, right, n):
        """``sum_l P_r left_l (P_c right_l)^T`` per sample (left: (n, L, rows), right: (n, L, cols))."""
        if self.projector.plan[name][0] != "matrix":
            return self.projector.project_param(name, torch.einsum("nlr,nlc->nrc", left, right))
        P_r, P_c = self.projector.factors(name, left.device, left.dtype)
        return torch.einsum("nlr,nlc->nrc", left @ P_r.T, right @ P_c.T).reshape(n, -1)

    def _embedding(self, name, tokens, dl, n, vocab):
        if self.projector.plan[name][0] != "matrix":
            grad = torch.zeros(n, vocab, dl.shape[-1], dtype=dl.dtype, device=dl.device)
            grad.scatter_add_(1, tokens.unsqueeze(-1).expand_as(dl), dl)
            return self.projector.project_param(name, grad)
        P_r, P_c = self.projector.factors(name, dl.device, dl.dtype)
        left = P_r.T[tokens]  # (n, L, k_r): the columns of P_r at the tokens
        return torch.einsum("nlr,nlc->nrc", left, dl @ P_c.T).reshape(n, -1)

    def _place(self, out, name, share):
        offset, dim = self.projector.plan[name][-2], self.projector.plan[name][-1]
        out[:, offset: offset + dim] = share

    def _merge(self, projected, extra):
        """Put the fallback parameters' blocks (``extra``, in their own order) into ``projected``."""
        sub, start = self.fallback.projector, 0
        for name in self.fallback_names:
            offset, dim = self.projector.plan[name][-2], self.projector.plan[name][-1]
            projected[..., offset: offset + dim] = extra[..., start: start + dim]
            start += dim
        assert start == sub.k
        return projected
