"""Several independent projections of the same gradients, side by side (``proj_draws``)."""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch

from .projection import Projector, make_projector, stable_seed

__all__ = ["DrawsProjector", "draw_seeds"]


def draw_seeds(seed: int, draws: int) -> list[int]:
    """The seed of each draw: ``seed`` itself, then seeds derived from ``(seed, i)`` by a stable hash.
    Consecutive seeds (``seed + i``, before) made ``proj_seed=1`` share a draw with ``proj_seed=0``."""
    return [int(seed)] + [stable_seed("proj_draw", int(seed), i) % (1 << 31) for i in range(1, draws)]


class DrawsProjector(Projector):
    """``draws`` independent projections of size ``k`` (seeds :func:`draw_seeds`, recorded in the config;
    a config without them is an older store's, whose draws had seeds ``seed, seed + 1, ...``), side by
    side: the output has ``draws x k`` columns, block ``i`` being exactly the projector of seed ``seeds[i]``.
    GradEx estimates with each block and averages the estimates (docs/gradex.md: averaging over
    independent draws is what measured to remove most of the projection's noise)."""

    def __init__(self, kind: str, param_shapes, k: int, seed: int = 0, *, draws: int = 2, seeds=None, **opts):
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 2:
            raise ValueError(f"draws must be an int >= 2, got {draws!r}")
        self.seeds = [int(x) for x in seeds] if seeds is not None else draw_seeds(seed, draws)
        if len(self.seeds) != draws:
            raise ValueError(f"{draws} draws need {draws} seeds, got {self.seeds!r}")
        self.parts = [make_projector(kind, param_shapes, k, s, **opts) for s in self.seeds]
        first = self.parts[0]
        super().__init__(param_shapes, k * draws, seed, block_size=first.block_size, cache_bytes=first.cache_bytes)
        self.kind, self.draws, self.k_draw = first.kind, draws, k
        self.structured = first.structured

    def config(self) -> dict:
        cfg = dict(self.parts[0].config())
        cfg.update({"k": self.k, "k_draw": self.k_draw, "draws": self.draws, "seed": self.seed,
                    "draw_seeds": list(self.seeds)})
        return cfg

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.project(grads) for p in self.parts], dim=-1)

    def project_part(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.project_part(name, x) for p in self.parts], dim=-1)

    def outer_part(self, name, left, right):  # the structured sketches' fast paths (tensorsketch)
        return torch.cat([p.outer_part(name, left, right) for p in self.parts], dim=-1)

    def embedding_part(self, name, tokens, delta):
        return torch.cat([p.embedding_part(name, tokens, delta) for p in self.parts], dim=-1)

    def effective_scale(self):
        return getattr(self.parts[0], "effective_scale", lambda: None)()

    def with_scale(self, scale: Mapping[str, torch.Tensor]) -> "DrawsProjector":
        out = copy.copy(self)
        out.parts = [p.with_scale(scale) for p in self.parts]  # each draw scales its own input
        return out

    def subset(self, names: Sequence[str]) -> "DrawsProjector":
        out = copy.copy(self)
        out.parts = [p.subset(names) for p in self.parts]
        out.param_shapes = {n: self.param_shapes[n] for n in names}
        out.numels = {n: self.numels[n] for n in names}
        out.d = sum(out.numels.values())
        return out

    def clear_cache(self) -> None:
        for p in self.parts:
            p.clear_cache()
