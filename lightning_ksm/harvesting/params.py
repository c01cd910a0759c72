"""Which parameters are linearized: selection by name patterns, and a projector over them."""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from torch import nn

from ..config import HarvestConfig
from .hooks import covered_parameters
from .projection import Projector, make_projector
from .tensorsketch import BANDS

__all__ = ["select_parameters", "projector_for_model", "resolve_projection", "TWO_SIDED_ROLES"]

# Hook roles whose weight gradients are sums of outer products (or token rows): the tensor sketch
# forms their share from the two sides, without the per-sample weight gradient.
TWO_SIDED_ROLES = frozenset({"linear", "conv1d", "embedding"})
# The smallest proj_dim at which "auto" takes the tensor sketch: it was measured as faithful as the
# SJLT at k = 1024 (bands of 256); its row and column hashes collide more in narrower bands, and a
# 4-task test at k = 32 came out wrong with it, so smaller sizes keep the SJLT.
AUTO_TENSORSKETCH_MIN_K = 1024

def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_parameters(
    model: nn.Module,
    *,
    params: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the parameters to linearize, in ``model.named_parameters()`` order.

    ``params``: explicit names (any parameter, frozen or not). Otherwise every parameter with
    ``requires_grad``, kept if it matches one of ``include`` (default: all) and none of ``exclude``.
    Patterns are shell globs (``"encoder.*.weight"``) or, prefixed with ``"re:"``, regular
    expressions searched in the name (``"re:^blocks\\.[01]\\."``).
    """
    named = dict(model.named_parameters())
    if params is not None:
        if isinstance(params, str):
            params = [params]
        unknown = [p for p in params if p not in named]
        if unknown:
            raise ValueError(f"model has no parameter(s) {unknown[:5]}; known: {list(named)[:10]}")
        if include is not None or exclude is not None:
            raise ValueError("pass either params= (explicit names) or include=/exclude= patterns, not both")
        wanted = set(params)
        return [n for n in named if n in wanted]
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    candidates = [n for n, p in named.items() if p.requires_grad]
    chosen = [
        n
        for n in candidates
        if (include is None or any(_matches(n, pat) for pat in include))
        and not any(_matches(n, pat) for pat in exclude)
    ]
    if not chosen:
        raise ValueError(
            f"no parameter selected (include={include}, exclude={exclude}) among the "
            f"{len(candidates)} trainable parameters, e.g. {candidates[:8]}"
        )
    return chosen


def projector_for_model(
    model: nn.Module,
    projection: str = HarvestConfig.projection,
    k: int | None = HarvestConfig.proj_dim,
    seed: int = 0,
    *,
    params: Sequence[str] | None = None,
    include=None,
    exclude=None,
    **opts,
) -> Projector:
    """A projector over the parameters :func:`select_parameters` picks (same arguments)."""
    names = select_parameters(model, params=params, include=include, exclude=exclude)
    shapes = dict(model.named_parameters())
    return make_projector(projection, {n: shapes[n].shape for n in names}, k, seed, **opts)


def resolve_projection(model: nn.Module, names: Sequence[str], config: HarvestConfig) -> str:
    """The projection a harvest of ``names`` under ``config`` really uses.

    - ``proj_dim x proj_draws >= d`` (the selected parameter count) for a sign/Gaussian sketch or
      ``auto``: ``identity``, since the exact gradients are no larger than their projections.
    - ``auto``: ``tensorsketch`` when the layer hooks form at least half of the selected weights
      from both sides of their outer products (Linear, GPT-2 Conv1D, Embedding) and
      ``grad_engine="hooks"``, ``proj_dim >= AUTO_TENSORSKETCH_MIN_K`` and ``proj_dim`` splits into
      the sketch's bands (measured as faithful as the SJLT against real retraining,
      benchmarks/results/factorized_fidelity.json, and 3-10x faster where it applies,
      benchmarks/results/harvest_throughput.json); ``factorized`` when ``nn.Conv2d`` weights the
      hooks cover hold at least half of them (torchvision's ResNet-18 against real retraining:
      at least as faithful as the SJLT and 30-60x faster to harvest, a pre-registered test,
      benchmarks/results/resnet18_planted_lr1e-5_factorized.json); ``sjlt`` otherwise (and on the
      ``vmap`` reference path).
    - any other value: itself.
    """
    kind = config.projection
    shapes = dict(model.named_parameters())
    d = sum(shapes[n].numel() for n in names)
    if kind in ("auto", "sjlt", "gaussian", "rademacher", "tensorsketch") and config.proj_dim * config.proj_draws >= d:
        return "identity"
    if kind != "auto":
        return kind
    if config.grad_engine != "hooks":
        return "sjlt"
    covered, _ = covered_parameters(model, names)

    def share(roles) -> int:
        return sum(shapes[n].numel() for n, uses in covered.items() if all(role in roles for _, role in uses))

    if 2 * share(TWO_SIDED_ROLES) >= d and config.proj_dim >= AUTO_TENSORSKETCH_MIN_K and not config.proj_dim % BANDS:
        return "tensorsketch"
    if 2 * share(("conv",)) >= d:
        return "factorized"  # convolution-heavy: measured as faithful as the SJLT there, 30-60x faster
    return "sjlt"
