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

:class:`FactorizedEngine` computes the projected gradients with module hooks for
``nn.Linear`` (any leading dims: sequences), ``nn.Conv2d`` (groups = 1, numeric padding, through
``unfold``), ``nn.Embedding`` (no ``max_norm``), transformers' ``Conv1D`` (GPT-2), their biases,
``nn.LayerNorm`` and BatchNorm with running statistics (eval mode: a per-channel affine map). Any other
selected parameter (or one shared with an uncovered module) falls back to the exact per-sample path
of :mod:`.engine` for that parameter alone. Samples must not interact inside the model (eval mode:
BatchNorm uses running statistics). ``logits`` mode needs one backward pass per class.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Engine, _first_nonfinite, _Forward, tree_map
from .outputs import scalarize
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


def _role(module: nn.Module, attr: str) -> str | None:
    """How the gradient of ``module.<attr>`` is formed from hooks, or None (not covered)."""
    if isinstance(module, nn.Linear):
        return {"weight": "linear", "bias": "bias"}.get(attr)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None
        return {"weight": "conv", "bias": "conv_bias"}.get(attr)
    if isinstance(module, nn.Embedding) and module.max_norm is None and attr == "weight":
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return {"weight": "ln_weight", "bias": "ln_bias"}.get(attr)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        # The harvest runs in eval mode, where BatchNorm is a per-channel affine map of its input.
        return {"weight": "bn_weight", "bias": "bn_bias"}.get(attr)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # transformers' Conv1D (GPT-2): y = x @ W + b with W of shape (in, out).
        return {"weight": "conv1d", "bias": "bias"}.get(attr)
    return None


def covered_parameters(model: nn.Module, names) -> tuple[dict, list]:
    """``({param name: [(module, role), ...]}, [fallback names])`` for the selected ``names``."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    uses: dict[str, list] = {}
    uncovered = set()
    wanted = set(names)
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            name = canonical.get(id(p))
            if name not in wanted:
                continue
            role = _role(module, attr)
            if role is None:
                uncovered.add(name)
            else:
                uses.setdefault(name, []).append((module, role))
    covered = {n: u for n, u in uses.items() if n not in uncovered}
    return covered, [n for n in names if n not in covered]


class FactorizedEngine:
    """The harvest engine of a :class:`FactorizedProjector`: same interface as :class:`.engine.Engine`."""

    def __init__(self, model, names, mode, projector: FactorizedProjector, weights, forward_fn, device, chunk_size):
        self.mode, self.projector, self.names, self.chunk_size = mode, projector, list(names), chunk_size
        self.model = model
        self.covered, fallback = covered_parameters(model, self.names)
        # W0 for every tensor, with the selected parameters as leaves that carry a graph.
        base = Engine(model, self.names, mode, projector, weights, forward_fn, device, chunk_size)
        self.const, self.sel, self.fmodel = base.const, base.sel, _Forward(model, forward_fn)
        self.fallback = None
        if fallback:
            share = sum(projector.numels[n] for n in fallback) / max(1, projector.d)
            warnings.warn(
                f"factorized projection: {len(fallback)} selected parameter(s) {fallback[:5]} ({share:.1%} of the "
                "selected weights) belong to layers it does not cover and go through the exact per-sample path, "
                "which costs a per-sample forward and backward pass; leave them out with exclude= if they "
                "do not matter", stacklevel=3,
            )
            self.fallback = Engine(model, fallback, mode, projector.subset(fallback), weights, forward_fn, device,
                                   chunk_size)
        self.fallback_names = fallback
        self.checked = False  # the batch-gradient check runs on the first chunk (see _check_sums)
        self._leaves: dict = {}

    def _call(self, inputs):
        merged = dict(self.const)
        self._leaves = {n: t.detach().requires_grad_(True) for n, t in self.sel.items()}
        merged.update({f"model.{n}": t for n, t in self._leaves.items()})
        return torch.func.functional_call(self.fmodel, merged, (inputs,))

    def forward_batch(self, inputs):
        with torch.no_grad():
            merged = dict(self.const)
            merged.update({f"model.{n}": t for n, t in self.sel.items()})
            return torch.func.functional_call(self.fmodel, merged, (inputs,))

    def run(self, inputs, labels, n: int, n_classes: int | None, batch_index: int):
        outs, jacs = [], []
        for s in range(0, n, self.chunk_size):
            e = min(n, s + self.chunk_size)
            xs = tree_map(lambda t: t[s:e], inputs)
            values, projected = self._chunk(xs, labels[s:e], n_classes)
            if self.fallback is not None:
                _, extra = self.fallback.run(xs, labels[s:e], e - s, n_classes, batch_index)
                projected = self._merge(projected, extra)
            self._check_finite(values, projected, s, batch_index)
            outs.append(values)
            jacs.append(projected)
        return torch.cat(outs), torch.cat(jacs)

    def _chunk(self, xs, labels, n_classes):
        modules = {m for uses in self.covered.values() for m, _ in uses}
        calls: dict = {m: [] for m in modules}
        n = labels.shape[0]

        def hook(module, inp, out):
            x = inp[0]
            if n > 1 and out.dim() > 0 and out.shape[0] == 1:
                # Computed once for the batch and broadcast (e.g. GPT-2's position embeddings): expand
                # it, so that the gradient is taken per sample rather than summed over the batch.
                out = out.expand(n, *out.shape[1:])
                x = x.expand(n, *x.shape[1:]) if x.dim() > 0 and x.shape[0] == 1 else x
                calls[module].append((x, out))
                return out
            calls[module].append((x, out))
            return None

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            out = self._call(xs)
        finally:
            for h in handles:
                h.remove()
        vector = self.mode == "logits"
        scalars = [out[:, c] for c in range(n_classes)] if vector else [scalarize(self.mode, out, labels)]
        outputs = [o for m in modules for _, o in calls[m]]
        check = not self.checked
        leaves = [self._leaves[name] for name in self.covered] if check else []
        blocks = []
        for i, scalar in enumerate(scalars):
            grads = torch.autograd.grad(scalar.sum(), outputs + leaves, retain_graph=i < len(scalars) - 1,
                                        allow_unused=True)
            if check and i == 0:
                batch_grads, grads = grads[len(outputs):], grads[:len(outputs)]
            elif check:
                grads = grads[:len(outputs)]
            delta, j = {}, 0
            for m in modules:
                delta[m] = []
                for inp, o in calls[m]:
                    g = grads[j]
                    delta[m].append((inp, torch.zeros_like(o) if g is None else g))
                    j += 1
            blocks.append(self._project(delta, scalar.shape[0]))
            if check and i == 0:
                self._check_sums(blocks[0], batch_grads)
                self.checked = True
        values = (out if vector else scalars[0]).detach()
        projected = torch.stack(blocks, dim=1) if vector else blocks[0]
        return values, projected

    def _check_sums(self, projected: torch.Tensor, batch_grads) -> None:
        """The projection is linear, so the per-sample blocks summed over the chunk must equal the
        projection of the chunk's ordinary gradient. They differ when the model uses a parameter
        outside the module that owns it (e.g. ``x @ self.embed.weight.T`` in ``forward``): the
        hooks never see that use, so its part of the gradient would be silently missing."""
        P = self.projector
        for name, g in zip(self.covered, batch_grads):
            offset, dim = P.plan[name][-2], P.plan[name][-1]
            got = projected[:, offset: offset + dim].sum(0).detach()
            want = P.project_param(name, (torch.zeros_like(self._leaves[name]) if g is None else g)[None])[0].detach()
            bad = not bool(torch.isfinite(want).all())
            if not bad:
                tol = (1e-3 if got.dtype != torch.float64 else 1e-8) * (float(want.norm()) + float(got.norm())) + 1e-12
                bad = float((got - want).norm()) > tol
            if bad:
                raise ValueError(
                    f"factorized projection: parameter {name!r} is used outside the module that owns it (or its "
                    "gradient is not finite): its gradient through the model differs from what the layer hooks "
                    "see, so its projected gradients would be wrong. Use projection='sjlt' (per-sample "
                    "gradients), or exclude= this parameter"
                )

    def _project(self, delta: dict, n: int) -> torch.Tensor:
        """The covered parameters' projected gradients ``(n, k)`` (fallback blocks left at 0)."""
        P = self.projector
        first = next(iter(self.sel.values()))
        out = torch.zeros(n, P.k, dtype=first.dtype, device=first.device)
        for name, uses in self.covered.items():
            plan = P.plan[name]
            offset, dim = plan[-2], plan[-1]
            total = 0
            for module, role in uses:
                for inp, d in delta[module]:
                    total = total + self._contribution(name, module, role, inp, d, n)
            out[:, offset: offset + dim] = total
        return out

    def _contribution(self, name, module, role, inp, d, n):
        P = self.projector
        matrix = P.plan[name][0] == "matrix"
        if role == "linear":
            a, dl = inp.reshape(n, -1, inp.shape[-1]), d.reshape(n, -1, d.shape[-1])
            return self._outer(name, dl, a, n, matrix)
        if role == "conv1d":
            a, dl = inp.reshape(n, -1, inp.shape[-1]), d.reshape(n, -1, d.shape[-1])
            return self._outer(name, a, dl, n, matrix)
        if role in ("bn_weight", "bn_bias"):
            flat_d = d.reshape(n, d.shape[1], -1)
            if role == "bn_bias":
                return P.project_param(name, flat_d.sum(2))
            shape = (1, -1) + (1,) * (inp.dim() - 2)
            # The statistics the forward pass used: W0's buffers (the live module's may have moved on
            # since the snapshot, e.g. when the harvest runs after training).
            prefix = name.rsplit(".", 1)[0]
            mean = self.const.get(f"model.{prefix}.running_mean", module.running_mean)
            var = self.const.get(f"model.{prefix}.running_var", module.running_var)
            xhat = (inp - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)
            return P.project_param(name, (flat_d * xhat.reshape(n, d.shape[1], -1)).sum(2))
        if role == "conv":
            u = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                         stride=module.stride)  # (n, in*kh*kw, L)
            return self._outer(name, d.reshape(n, d.shape[1], -1).transpose(1, 2), u.transpose(1, 2), n, matrix)
        if role == "embedding":
            tokens = inp.reshape(n, -1)
            dl = d.reshape(n, tokens.shape[1], -1)
            if module.padding_idx is not None:
                dl = dl * (tokens != module.padding_idx).unsqueeze(-1).to(dl.dtype)
            if not matrix:
                grad = torch.zeros(n, module.num_embeddings, dl.shape[-1], dtype=dl.dtype, device=dl.device)
                grad.scatter_add_(1, tokens.unsqueeze(-1).expand_as(dl), dl)
                return P.project_param(name, grad)
            P_r, P_c = P.factors(name, dl.device, dl.dtype)
            left = P_r.T[tokens]  # (n, L, k_r): the columns of P_r at the tokens
            return torch.einsum("nlr,nlc->nrc", left, dl @ P_c.T).reshape(n, -1)
        if role == "bias":
            return P.project_param(name, d.reshape(n, -1, d.shape[-1]).sum(1))
        if role == "conv_bias":
            return P.project_param(name, d.reshape(n, d.shape[1], -1).sum(2))
        dims = tuple(range(inp.dim() - len(module.normalized_shape), inp.dim()))
        if role == "ln_weight":
            mean = inp.mean(dim=dims, keepdim=True)
            var = inp.var(dim=dims, unbiased=False, keepdim=True)
            xhat = (inp - mean) / torch.sqrt(var + module.eps)
            grad = (d * xhat).reshape(n, -1, *module.normalized_shape).sum(1)
        else:  # ln_bias
            grad = d.reshape(n, -1, *module.normalized_shape).sum(1)
        return P.project_param(name, grad)

    def _outer(self, name, left, right, n, matrix):
        """``sum_l P_r left_l (P_c right_l)^T`` per sample (left: (n, L, rows), right: (n, L, cols))."""
        if not matrix:
            return self.projector.project_param(name, torch.einsum("nlr,nlc->nrc", left, right))
        P_r, P_c = self.projector.factors(name, left.device, left.dtype)
        return torch.einsum("nlr,nlc->nrc", left @ P_r.T, right @ P_c.T).reshape(n, -1)

    def _merge(self, projected, extra):
        """Put the fallback parameters' blocks (``extra``, in their own order) into ``projected``."""
        sub, start = self.fallback.projector, 0
        for name in self.fallback_names:
            offset, dim = self.projector.plan[name][-2], self.projector.plan[name][-1]
            projected[..., offset: offset + dim] = extra[..., start: start + dim]
            start += dim
        assert start == sub.k
        return projected

    @staticmethod
    def _check_finite(values, projected, offset, batch_index):
        i = _first_nonfinite(values)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the model output is not finite")
        i = _first_nonfinite(projected)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the projected gradient is not finite")
