"""Per-sample gradients of whole layers from module hooks and one batched backward pass.

For ``nn.Linear`` the per-sample weight gradient is ``G = sum_l delta_l a_l^T`` over positions ``l``
(``a``: the layer's input, ``delta``: the gradient of the per-sample output with respect to the
layer's output). Forward hooks keep ``a`` and the layer outputs; one ``autograd.grad`` of the summed
per-sample outputs gives every ``delta`` of the batch at once (samples do not interact: the harvest
runs in eval mode). :class:`HookEngine` turns these pieces into each covered parameter's projected
share; how a share is formed is its subclasses' job:

- :class:`~lightning_ksm.harvesting.layerwise.LayerwiseEngine` forms the per-sample gradient of one
  layer at a time and projects it with the run's projector (SJLT, Gaussian, ...): the features equal
  the per-sample ``vmap`` path's (:mod:`.engine`), at the cost of one batched backward pass;
- :class:`~lightning_ksm.harvesting.factorized.FactorizedEngine` projects the two sides of the outer
  products separately (the Kronecker projection), never forming a per-sample weight gradient.

Covered: ``nn.Linear`` (any leading dims: sequences), ``nn.Conv2d`` (groups = 1, numeric padding,
through ``unfold``), ``nn.Embedding`` (no ``max_norm``), transformers' ``Conv1D`` (GPT-2), their
biases, ``nn.LayerNorm`` and BatchNorm with running statistics (eval mode: a per-channel affine map).
Any other selected parameter (or one shared with an uncovered module) goes through the per-sample
path of :mod:`.engine` for that parameter alone. A parameter used outside the module that owns it is
caught on the first chunk (the shares summed over the chunk must equal the projected batch
gradient). ``logits`` mode takes one backward pass per class.
"""

from __future__ import annotations

import math

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Engine, _first_nonfinite, _Forward, tree_map
from .outputs import scalarize

__all__ = ["HookEngine", "HookCoverageError", "covered_parameters"]


class HookCoverageError(ValueError):
    """Parameters whose gradient through the model differs from what their layer's hooks see."""

    def __init__(self, message, names=()):
        super().__init__(message)
        self.names = list(names)


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


class HookEngine:
    """A harvest engine (same interface as :class:`.engine.Engine`) built on layer hooks.

    Subclasses define how a parameter's share of the projected output is formed:
    ``_full(name, grad)`` from full per-sample gradients ``(n, *shape)`` (small parameters),
    ``_outer(name, left, right, n)`` from ``sum_l left_l right_l^T`` (``left``: ``(n, L, rows)``,
    ``right``: ``(n, L, cols)``), ``_embedding(name, tokens, delta, n, vocab)``, and how shares are
    put together (``_place``) and the fallback's projection merged (``_merge``).
    ``uncovered``: parameter names sent to the per-sample path even if their layer is covered.
    """

    what = "layer-hook harvest"
    remedy = "Exclude it with exclude=, or harvest it per sample"


    def __init__(self, model, names, mode, projector, weights, forward_fn, device, chunk_size, uncovered=(),
                 warn=True):
        self.mode, self.projector, self.names, self.chunk_size = mode, projector, list(names), chunk_size
        self.model = model
        covered, fallback = covered_parameters(model, self.names)
        skip = self._per_sample_roles(projector)
        forced = set(uncovered) | {n for n, uses in covered.items() if any(role in skip for _, role in uses)}
        self.covered = {n: u for n, u in covered.items() if n not in forced}
        unknown = fallback  # parameters of layers the hooks do not know: worth a warning
        fallback = [n for n in self.names if n not in self.covered]
        # W0 for every tensor, with the selected parameters as leaves that carry a graph.
        base = Engine(model, self.names, mode, projector, weights, forward_fn, device, chunk_size)
        self.const, self.sel, self.fmodel = base.const, base.sel, _Forward(model, forward_fn)
        self.fallback = None
        if warn and unknown:
            share = sum(projector.numels[n] for n in unknown) / max(1, projector.d)
            warnings.warn(
                f"{self.what}: {len(unknown)} selected parameter(s) {unknown[:5]} ({share:.1%} of the "
                "selected weights) belong to layers it does not cover and go through the exact per-sample path, "
                "which costs a per-sample forward and backward pass; leave them out with exclude= if they "
                "do not matter", stacklevel=4,
            )
        if fallback:
            self.fallback = Engine(model, fallback, mode, projector.subset(fallback), weights, forward_fn, device,
                                   chunk_size)
        self.fallback_names = fallback
        self.checked = False  # the batch-gradient check runs on the first chunk (see _check_sums)
        self._leaves: dict = {}
        # Modules whose output (or input) the model modifies in place after the module ran (e.g.
        # torchvision's ReLU(inplace=True) after BatchNorm): the hooks keep a copy for those, or the
        # output's gradient would be taken after the in-place op (found on the first chunk).
        self._copy_out: set = set()
        self._copy_in: set = set()

    # -- what subclasses define ----------------------------------------------------------------
    def _per_sample_roles(self, projector) -> frozenset:
        """Roles left to the per-sample path even though the hooks could form them."""
        return frozenset()

    def _full(self, name, grad):
        raise NotImplementedError

    def _outer(self, name, left, right, n):
        raise NotImplementedError

    def _embedding(self, name, tokens, delta, n, vocab):
        raise NotImplementedError

    def _place(self, out, name, share):
        raise NotImplementedError

    def _merge(self, projected, extra):
        raise NotImplementedError

    # -- the batched pass ----------------------------------------------------------------------
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
        modules = list(dict.fromkeys(m for uses in self.covered.values() for m, _ in uses))
        calls: dict = {m: [] for m in modules}
        n = labels.shape[0]

        versions: dict = {m: [] for m in modules}
        taps: list = []  # one zero scalar leaf per call, added to its output (see below)

        def hook(module, inp, out):
            x = inp[0]
            if module in self._copy_in:
                x = x.detach().clone()  # the values the module saw; the model changes x in place later
            if n > 1 and out.dim() > 0 and out.shape[0] == 1:
                # Computed once for the batch and broadcast (e.g. GPT-2's position embeddings): expand
                # it, so that the gradient is taken per sample rather than summed over the batch.
                out = out.expand(n, *out.shape[1:])
                x = x.expand(n, *x.shape[1:]) if x.dim() > 0 and x.shape[0] == 1 else x
            # out + 0: a leaf on every output, so that one backward pass to these leaves reaches every
            # output (its gradient arrives in the tensor hook set in _stream), with no weight gradients
            # formed and no output gradient kept after its layer's share is taken.
            tap = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            taps.append(tap)
            tapped = out + tap
            calls[module].append((x, tapped))
            versions[module].append((x, x._version, tapped._version))
            return tapped.clone() if module in self._copy_out else tapped  # in-place ops downstream hit the copy

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            out = self._call(xs)
        finally:
            for h in handles:
                h.remove()
        changed_out = {m for m in modules for (_, o), (_, _, v) in zip(calls[m], versions[m]) if o._version != v}
        changed_in = {m for m in modules for x, v, _ in versions[m] if x._version != v}
        if changed_out - self._copy_out or changed_in - self._copy_in:  # once: redo with copies
            self._copy_out |= changed_out
            self._copy_in |= changed_in
            return self._chunk(xs, labels, n_classes)
        vector = self.mode == "logits"
        scalars = [out[:, c] for c in range(n_classes)] if vector else [scalarize(self.mode, out, labels)]
        check = not self.checked
        leaves = [self._leaves[name] for name in self.covered] if check else []
        blocks = []
        for i, scalar in enumerate(scalars):
            last = i == len(scalars) - 1
            projected, shares, batch_grads = self._stream(calls, scalar, taps, leaves, n, keep=check and i == 0,
                                                          release=last)
            blocks.append(projected)
            if check and i == 0:
                self._check_sums(shares, batch_grads)
                self.checked = True
        values = (out if vector else scalars[0]).detach()
        projected = torch.stack(blocks, dim=1) if vector else blocks[0]
        return values, projected

    def _stream(self, calls: dict, scalar, taps: list, leaves: list, n: int, keep: bool, release: bool):
        """One backward pass of ``scalar.sum()``: each layer call's share of the projected gradients
        is formed as its output gradient arrives (a tensor hook), then that gradient, and on the
        last pass (``release``) the layer's saved input, are let go: the harvest holds about what
        training's backward holds, not every layer's inputs and output gradients of the chunk at
        once. Returns ``(projected (n, k), shares per parameter if keep, the leaves' gradients)``."""
        first = next(iter(self.sel.values()))
        out = torch.zeros(n, self.projector.k, dtype=first.dtype, device=first.device)
        uses_of: dict = {}
        for name, uses in self.covered.items():
            for module, role in uses:
                uses_of.setdefault(module, []).append((name, role))
        # a parameter is placed once all its uses are in: a tied weight's shares add up first
        remaining = {name: sum(len(calls[m]) for m, _ in uses) for name, uses in self.covered.items()}
        partial: dict = {}
        shares: dict = {}
        fired: set = set()

        def take(module, j, d):
            fired.add((module, j))
            inp = calls[module][j][0]
            for name, role in uses_of[module]:
                c = self._contribution(name, module, role, inp, d, n)
                partial[name] = c if name not in partial else partial[name] + c
                remaining[name] -= 1
                if remaining[name] == 0:
                    self._place(out, name, partial[name])
                    if keep:
                        shares[name] = partial[name]
                    del partial[name]
            if release:
                calls[module][j] = (None, None)

        handles = []
        for module, made in calls.items():
            for j, (_, tapped) in enumerate(made):
                handles.append(tapped.register_hook(lambda g, m=module, j=j: take(m, j, g)))
        try:
            grads = torch.autograd.grad(scalar.sum(), taps + leaves, retain_graph=not release, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for module, made in calls.items():  # outputs the scalar does not depend on: a zero gradient
            for j, (_, tapped) in enumerate(made):
                if (module, j) not in fired:
                    take(module, j, torch.zeros_like(tapped))
        return out, shares, grads[len(taps):]

    def _check_sums(self, shares: dict, batch_grads) -> None:
        """The projection is linear, so a parameter's per-sample shares summed over the chunk must
        equal the share of the chunk's ordinary gradient. They differ when the model uses a parameter
        outside the module that owns it (e.g. ``x @ self.embed.weight.T`` in ``forward``): the hooks
        never see that use, so its part of the gradient would be silently missing."""
        pairs = {}
        for name, g in zip(self.covered, batch_grads):
            got = shares[name].sum(0).detach()
            full = torch.zeros_like(self._leaves[name]) if g is None else g
            pairs[name] = (got, self._full(name, full[None].to(got.dtype))[0].detach())
        # Relative to each parameter's own share, with a floor relative to the whole chunk's: a share
        # that is ~0 (GPT-2's final LayerNorm bias under a 2-class head: 2e-8 of a total of 27) would
        # otherwise fail on float32 rounding alone.
        total = math.sqrt(sum(float(w.norm()) ** 2 for _, w in pairs.values() if bool(torch.isfinite(w).all())))
        bad_names = []
        for name, (got, want) in pairs.items():
            rtol = 1e-3 if got.dtype != torch.float64 else 1e-8
            bad = not bool(torch.isfinite(want).all())
            if not bad:
                tol = rtol * (float(want.norm()) + float(got.norm()) + 1e-3 * total) + 1e-12
                bad = float((got - want).norm()) > tol
            if bad:
                bad_names.append(name)
        if bad_names:
            which = ", ".join(map(repr, bad_names[:5]))
            raise HookCoverageError((
                f"{self.what}: parameter {which} {'is' if len(bad_names) == 1 else 'are'} used outside the module "
                "that owns it (or its gradient is not finite): the gradient through the model differs from what "
                f"the layer hooks see, so its projected gradients would be wrong. {self.remedy}"), bad_names)

    def _contribution(self, name, module, role, inp, d, n):
        if role == "linear":
            a, dl = inp.reshape(n, -1, inp.shape[-1]), d.reshape(n, -1, d.shape[-1])
            return self._outer(name, dl, a, n)
        if role == "conv1d":
            a, dl = inp.reshape(n, -1, inp.shape[-1]), d.reshape(n, -1, d.shape[-1])
            return self._outer(name, a, dl, n)
        if role in ("bn_weight", "bn_bias"):
            flat_d = d.reshape(n, d.shape[1], -1)
            if role == "bn_bias":
                return self._full(name, flat_d.sum(2))
            shape = (1, -1) + (1,) * (inp.dim() - 2)
            # The statistics the forward pass used: W0's buffers (the live module's may have moved on
            # since the snapshot, e.g. when the harvest runs after training).
            prefix = name.rsplit(".", 1)[0]
            mean = self.const.get(f"model.{prefix}.running_mean", module.running_mean)
            var = self.const.get(f"model.{prefix}.running_var", module.running_var)
            xhat = (inp - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)
            return self._full(name, (flat_d * xhat.reshape(n, d.shape[1], -1)).sum(2))
        if role == "conv":
            u = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                         stride=module.stride)  # (n, in*kh*kw, L)
            return self._outer(name, d.reshape(n, d.shape[1], -1).transpose(1, 2), u.transpose(1, 2), n)
        if role == "embedding":
            tokens = inp.reshape(n, -1)
            dl = d.reshape(n, tokens.shape[1], -1)
            if module.padding_idx is not None:
                dl = dl * (tokens != module.padding_idx).unsqueeze(-1).to(dl.dtype)
            return self._embedding(name, tokens, dl, n, module.num_embeddings)
        if role == "bias":
            return self._full(name, d.reshape(n, -1, d.shape[-1]).sum(1))
        if role == "conv_bias":
            return self._full(name, d.reshape(n, d.shape[1], -1).sum(2))
        dims = tuple(range(inp.dim() - len(module.normalized_shape), inp.dim()))
        if role == "ln_weight":
            mean = inp.mean(dim=dims, keepdim=True)
            var = inp.var(dim=dims, unbiased=False, keepdim=True)
            xhat = (inp - mean) / torch.sqrt(var + module.eps)
            grad = (d * xhat).reshape(n, -1, *module.normalized_shape).sum(1)
        else:  # ln_bias
            grad = d.reshape(n, -1, *module.normalized_shape).sum(1)
        return self._full(name, grad)

    @staticmethod
    def _check_finite(values, projected, offset, batch_index):
        i = _first_nonfinite(values)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the model output is not finite")
        i = _first_nonfinite(projected)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the projected gradient is not finite")
