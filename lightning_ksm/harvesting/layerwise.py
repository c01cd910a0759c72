"""The default harvest engine: each layer's share of the projected per-sample gradient, from hooks.

:class:`LayerwiseEngine` uses the hooks of :mod:`.hooks` (one ordinary batched backward pass). For a
structured sketch (the tensor sketch, what ``projection="auto"`` takes for Linear/Embedding-heavy
models) a layer's share is formed from the two sides of its outer products, with no per-sample
weight gradient; for any other summable projector it forms, layer by layer, the per-sample weight
gradients ``sum_l delta_l a_l^T`` and hands each to the run's projector
(:meth:`~lightning_ksm.harvesting.projection.Projector.project_part`). Either way a projection is a
sum of per-parameter shares, so the result is the same linear map of the same gradients as the
per-sample ``vmap`` path of :mod:`.engine` (tested to float tolerance), without one forward and
backward pass per sample. At most ``MAX_ENTRIES`` gradient entries of one layer exist at a time
(samples are taken in groups small enough for that). Convolution weights go per sample.
"""

from __future__ import annotations

import torch

from .hooks import HookEngine

__all__ = ["LayerwiseEngine", "MAX_ENTRIES"]

# Per-sample gradient entries of one layer formed at once (64 MiB in float32).
MAX_ENTRIES = 2**24


class LayerwiseEngine(HookEngine):
    """Exact per-sample layer gradients from hooks, projected by any summable projector."""

    what = "layer-hook harvest"

    def _per_sample_roles(self, projector) -> frozenset:
        # A convolution's per-sample weight gradient sums over every output position: formed from the
        # hooks it costs an einsum over those positions (or, for the tensor sketch, an FFT at each
        # position) that the per-sample path's convolution backward does faster (measured on
        # ResNet-18, benchmarks/harvest_throughput.py), so conv weights go per sample under every
        # projection and are projected by the same map.
        return frozenset({"conv"})

    def _groups(self, n: int, numel: int):
        step = max(1, MAX_ENTRIES // max(1, numel))
        return [(s, min(n, s + step)) for s in range(0, n, step)]

    def _full(self, name, grad):
        n = grad.shape[0]
        return self.projector.project_part(name, grad.reshape(n, -1))

    def _outer(self, name, left, right, n):
        if self.projector.structured:  # a structured sketch: formed from the two sides
            return self.projector.outer_part(name, left, right)
        numel = left.shape[-1] * right.shape[-1]
        parts = [self.projector.project_part(name, torch.einsum("nlr,nlc->nrc", left[s:e], right[s:e]).reshape(e - s, -1))
                 for s, e in self._groups(n, numel)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _embedding(self, name, tokens, dl, n, vocab):
        if self.projector.structured:
            return self.projector.embedding_part(name, tokens, dl)
        parts = []
        for s, e in self._groups(n, vocab * dl.shape[-1]):
            grad = torch.zeros(e - s, vocab, dl.shape[-1], dtype=dl.dtype, device=dl.device)
            grad.scatter_add_(1, tokens[s:e].unsqueeze(-1).expand_as(dl[s:e]), dl[s:e])
            parts.append(self.projector.project_part(name, grad.reshape(e - s, -1)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _place(self, out, name, share):
        out += share

    def _merge(self, projected, extra):
        if extra.shape[-1] != projected.shape[-1]:  # identity: the fallback's columns are its parameters'
            columns = self.projector.columns(self.fallback_names)
            projected = projected.clone()
            projected[..., columns] += extra
            return projected
        return projected + extra  # the fallback's projector is the same maps on its parameters
