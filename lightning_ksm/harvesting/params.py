"""Which parameters are linearized: selection by name patterns, and a projector over them."""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from torch import nn

from ..config import HarvestConfig
from .projection import Projector, make_projector

__all__ = ["select_parameters", "projector_for_model"]

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
