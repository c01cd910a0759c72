"""Seeded random projections of per-sample gradients, from parameter space (dimension d) to k dims.

A projector maps a gradient made of named parameter tensors, ``g = (g_b)`` over parameter blocks
``b``, to ``P g = sum_b P_b g_b``. Every block matrix ``P_b`` is generated on demand from a torch
``Generator`` seeded by a stable 64-bit hash of ``(kind, seed, parameter name, block index)``, so any
process (another rank, a resumed run, a later analysis) regenerates exactly the same projection from
the JSON config, and no k x d matrix is ever held at once. Large parameters are split into column
blocks of bounded size; generated blocks are cached up to ``cache_bytes`` and regenerated beyond it.

Kinds:

- ``"gaussian"``: dense, i.i.d. N(0, 1/k) entries;
- ``"rademacher"``: dense, i.i.d. +-1/sqrt(k) entries;
- ``"sjlt"``: sparse sign sketch (sparse Johnson-Lindenstrauss transform): each coordinate has ``s``
  nonzeros +-1/sqrt(s), the a-th of them in its own row band ``[a k/s, (a+1) k/s)``, so the rows of a
  column are distinct. It stores int32 bucket indices per coordinate (O(d s) memory) and applies them
  with a sparse matrix product (O(n d s) time);
- ``"identity"`` (alias ``"none"``): no projection, k = d; the flat gradient, for tests and tiny models.

All random kinds preserve inner products in expectation: E[<P g, P h>] = <g, h>.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import warnings
from typing import Mapping, Sequence

import torch

CONFIG_VERSION = 1
DEFAULT_CACHE_BYTES = 256 * 2**20
# Dense blocks hold at most this many matrix entries (16 MiB in float32) while they are generated.
_DENSE_BLOCK_ENTRIES = 2**22
KINDS = ("gaussian", "rademacher", "sjlt", "tensorsketch", "identity", "factorized")

__all__ = ["Projector", "GaussianProjector", "RademacherProjector", "SJLTProjector", "IdentityProjector",
           "make_projector", "projector_from_config", "param_shapes_of", "stable_seed", "KINDS"]
_ALIASES = {"none": "identity", "dense": "gaussian", "countsketch": "sjlt"}


def stable_seed(*parts: object) -> int:
    """A 63-bit integer hash of ``parts`` that is identical in every process and Python version."""
    text = "|".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _normalize_shapes(param_shapes) -> dict[str, tuple[int, ...]]:
    if isinstance(param_shapes, Mapping):
        items = list(param_shapes.items())
    else:
        items = list(param_shapes)
    if not items:
        raise ValueError("param_shapes is empty: a projector needs at least one parameter")
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"param_shapes entries must be (name, shape) pairs, got {item!r}")
        name, shape = item
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}")
        if isinstance(shape, torch.Tensor):
            shape = shape.shape
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape of parameter {name!r} must be a sequence of ints, got {shape!r}") from None
        if any(s < 0 for s in shape):
            raise ValueError(f"shape of parameter {name!r} has a negative size: {shape}")
        if name in shapes:
            raise ValueError(f"parameter {name!r} appears twice in param_shapes")
        shapes[name] = shape
    return shapes


class Projector:
    """Base class: a linear map from named parameter gradients to k dims (see the module docstring).

    Subclasses implement ``_apply_block(x, name, block, c0, c1)`` returning ``x @ P_block^T`` for the
    column slice ``x = flat_grad[:, c0:c1]``.
    """

    kind = "base"
    # True for sketches that form an outer product's share from its two sides (outer_part,
    # embedding_part: the tensor sketch); the layer hooks then never form per-sample weight gradients.
    structured = False

    def __init__(
        self,
        param_shapes,
        k: int,
        seed: int = 0,
        *,
        block_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.param_shapes = _normalize_shapes(param_shapes)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (the projection dimension) must be a positive int, got {k!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.k = k
        self.seed = seed
        self.numels = {n: math.prod(s) for n, s in self.param_shapes.items()}
        self.d = sum(self.numels.values())
        if block_size is None:
            block_size = self._default_block_size()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0
        self.scale: dict[str, torch.Tensor] | None = None  # elementwise factors applied first (with_scale)

    # -- description -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Parameter names, in the order of the flat gradient vector."""
        return list(self.param_shapes)

    def _default_block_size(self) -> int:
        return max(1, _DENSE_BLOCK_ENTRIES // self.k)

    def _extra_config(self) -> dict:
        return {}

    def config(self) -> dict:
        """A JSON-able dict from which :func:`projector_from_config` rebuilds this projector."""
        cfg = {
            "version": CONFIG_VERSION,
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "block_size": self.block_size,
            "params": [[n, list(s)] for n, s in self.param_shapes.items()],
        }
        cfg.update(self._extra_config())
        return cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, d={self.d}, k={self.k}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Projector) and self.config() == other.config()

    __hash__ = None  # mutable cache; compare by config

    def blocks(self, name: str) -> list[tuple[int, int]]:
        """Column ranges ``[(c0, c1), ...]`` into which parameter ``name`` is split."""
        n = self.numels[name]
        return [(c0, min(c0 + self.block_size, n)) for c0 in range(0, n, self.block_size)]

    def clear_cache(self) -> None:
        """Forget generated blocks (they are regenerated identically when needed)."""
        self._cache.clear()
        self._cached_bytes = 0

    # -- block generation with a bounded cache -------------------------------------------------
    def _generator(self, name: str, block: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(stable_seed(self.kind, self.seed, name, block))
        return g

    def _cached(self, key: tuple, make) -> torch.Tensor:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        value = make()
        size = _nbytes(value)
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = value
            self._cached_bytes += size
        return value

    # -- projection ----------------------------------------------------------------------------
    def _apply_block(self, x: torch.Tensor, name: str, block: int, c0: int, c1: int) -> torch.Tensor:
        raise NotImplementedError

    def _check_grads(self, grads: Mapping[str, torch.Tensor]):
        """Validate ``grads``; return (leading dims, number of rows, compute dtype, device)."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict name -> tensor, got {type(grads).__name__}")
        missing = [n for n in self.param_shapes if n not in grads]
        extra = [n for n in grads if n not in self.param_shapes]
        if missing or extra:
            raise ValueError(
                f"gradients do not match the projector's parameters: missing {missing[:5]}, "
                f"unexpected {extra[:5]} (build the projector for the same parameter selection)"
            )
        lead = None
        device = None
        dtype = torch.float32
        for name, shape in self.param_shapes.items():
            g = grads[name]
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"gradient of parameter {name!r} must be a tensor, got {type(g).__name__}")
            nd = len(shape)
            if g.dim() < nd or tuple(g.shape[g.dim() - nd:]) != shape:
                raise ValueError(
                    f"gradient of parameter {name!r} has shape {tuple(g.shape)}; expected "
                    f"(*leading dims, {', '.join(map(str, shape))})"
                )
            this_lead = tuple(g.shape[: g.dim() - nd])
            if lead is None:
                lead, device = this_lead, g.device
            elif this_lead != lead:
                raise ValueError(
                    f"gradient of parameter {name!r} has leading dims {this_lead} but others have {lead}"
                )
            if g.dtype == torch.float64:
                dtype = torch.float64
        return lead, math.prod(lead), dtype, device

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project named gradients.

        ``grads[name]`` has shape ``(*lead, *param_shape)`` with the same leading dims ``lead`` for
        every parameter, e.g. ``(batch,)`` or ``(batch, C)`` for a logits Jacobian; the result has
        shape ``(*lead, k)`` and dtype float32 (float64 if the gradients are float64).
        """
        lead, rows, dtype, device = self._check_grads(grads)
        out = torch.zeros(rows, self.k, dtype=dtype, device=device)
        for name in self.param_shapes:
            if self.numels[name]:
                out += self.project_part(name, grads[name].reshape(rows, self.numels[name]).to(dtype))
        return out.reshape(*lead, self.k)

    def project_part(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One parameter's share ``(rows, k)`` of :meth:`project`, from its flat gradients ``x``
        ``(rows, numel)``: the projection is a sum over parameters, so the shares add up to it (the
        layer-hook harvest projects each layer's per-sample gradients this way, one layer at a time)."""
        if self.scale is not None:
            x = x * self.scale[name].to(x).reshape(-1)
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        for b, (c0, c1) in enumerate(self.blocks(name)):
            out += self._apply_block(x[:, c0:c1], name, b, c0, c1)
        return out

    def with_scale(self, scale: Mapping[str, torch.Tensor]) -> "Projector":
        """The projection of ``scale * grad`` (per parameter, elementwise; e.g. the watched Adam's
        preconditioner): a copy sharing the generated blocks."""
        out = copy.copy(self)
        out.scale = {n: scale[n].detach().reshape(-1) for n in self.param_shapes}
        return out

    def subset(self, names: Sequence[str]) -> "Projector":
        """The same maps restricted to the parameters ``names`` (blocks are seeded by parameter
        name, so each share is identical to this projector's); the scale is kept."""
        cfg = dict(self.config())
        cfg["params"] = [[n, list(self.param_shapes[n])] for n in names]
        out = projector_from_config(cfg, cache_bytes=self.cache_bytes)
        return out if self.scale is None else out.with_scale(self.scale)

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project flat gradients ``(*lead, d)`` laid out as the parameters in :attr:`names` order."""
        if flat.shape[-1] != self.d:
            raise ValueError(f"flat gradients must have last dim d={self.d}, got shape {tuple(flat.shape)}")
        lead = flat.shape[:-1]
        grads = {}
        offset = 0
        for name, shape in self.param_shapes.items():
            n = self.numels[name]
            grads[name] = flat[..., offset: offset + n].reshape(*lead, *shape)
            offset += n
        return self.project(grads)

    def materialize(self, dtype: torch.dtype = torch.float64, max_entries: int = 2**24) -> torch.Tensor:
        """The explicit ``(k, d)`` matrix, built by projecting the unit vectors (tiny d only: tests)."""
        if self.k * self.d > max_entries:
            raise ValueError(
                f"refusing to materialize a {self.k} x {self.d} projection (> {max_entries} entries)"
            )
        eye = torch.eye(self.d, dtype=dtype)
        return self.project_flat(eye).T.contiguous()


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    if t.layout == torch.sparse_csr:
        return sum(_nbytes(x) for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


class _DenseProjector(Projector):
    """Dense i.i.d. projection; blocks are ``(cols, k)`` matrices so ``x @ M`` projects a block."""

    def _generate(self, name: str, block: int, cols: int) -> torch.Tensor:
        raise NotImplementedError

    def _apply_block(self, x, name, block, c0, c1):
        key = (name, block, str(x.device))

        def make():
            return self._generate(name, block, c1 - c0).to(x.device)

        m = self._cached(key, make)
        return x @ m.to(x.dtype)


class GaussianProjector(_DenseProjector):
    """Dense projection with i.i.d. N(0, 1/k) entries."""

    kind = "gaussian"

    def _generate(self, name, block, cols):
        m = torch.randn(cols, self.k, generator=self._generator(name, block), dtype=torch.float32)
        return m.mul_(1.0 / math.sqrt(self.k))


class RademacherProjector(_DenseProjector):
    """Dense projection with i.i.d. +-1/sqrt(k) entries."""

    kind = "rademacher"

    def _generate(self, name, block, cols):
        bits = torch.randint(0, 2, (cols, self.k), generator=self._generator(name, block), dtype=torch.int8)
        m = bits.to(torch.float32).mul_(2.0).sub_(1.0)
        return m.mul_(1.0 / math.sqrt(self.k))


class IdentityProjector(Projector):
    """No projection: ``k = d`` and the result is the flat gradient (tests and tiny models only)."""

    kind = "identity"

    def __init__(self, param_shapes, k: int | None = None, seed: int = 0, **_ignored) -> None:
        shapes = _normalize_shapes(param_shapes)
        d = sum(math.prod(s) for s in shapes.values())
        if k is not None and k != d:
            raise ValueError(f"the identity projector has k = d = {d}; got k={k}")
        super().__init__(shapes, d, seed, block_size=max(1, d), cache_bytes=0)

    def project(self, grads):
        """The flat gradient ``(*lead, d)``: parameters concatenated in :attr:`names` order."""
        lead, rows, dtype, _ = self._check_grads(grads)
        parts = [self._scaled(n, grads[n].reshape(rows, self.numels[n]).to(dtype)) for n in self.param_shapes]
        return torch.cat(parts, dim=1).reshape(*lead, self.k)

    def _scaled(self, name, x):
        return x if self.scale is None else x * self.scale[name].to(x).reshape(-1)

    def subset(self, names):
        out = IdentityProjector({n: self.param_shapes[n] for n in names}, seed=self.seed)
        return out if self.scale is None else out.with_scale(self.scale)

    def project_part(self, name, x):
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        out[:, self.columns([name])] = self._scaled(name, x)
        return out

    def columns(self, names) -> torch.Tensor:
        """The positions of ``names``' entries in the flat gradient (a subset's features go there)."""
        offsets = dict(zip(self.names, itertools.accumulate([0] + [self.numels[n] for n in self.names])))
        return torch.cat([torch.arange(offsets[n], offsets[n] + self.numels[n]) for n in names])

    def _apply_block(self, x, name, block, c0, c1):  # pragma: no cover - project() is overridden
        raise NotImplementedError


from .sjlt import SJLTProjector  # noqa: E402  (these subclass Projector, defined above)
from .tensorsketch import TensorSketchProjector  # noqa: E402

_CLASSES = {
    "gaussian": GaussianProjector,
    "rademacher": RademacherProjector,
    "sjlt": SJLTProjector,
    "tensorsketch": TensorSketchProjector,
    "identity": IdentityProjector,
}


def make_projector(kind: str, param_shapes, k: int | None, seed: int = 0, **opts) -> Projector:
    """Build a seeded projector.

    ``kind``: ``"gaussian"``, ``"rademacher"``, ``"sjlt"``, ``"identity"`` (``"none"``) or
    ``"factorized"`` (:mod:`.factorized`: ``k`` is then the budget per parameter).
    ``param_shapes``: ``{name: shape}`` (shapes may be ``torch.Size``, tuples or tensors) or a
    sequence of ``(name, shape)`` pairs; the order defines the flat layout used by ``project_flat``.
    ``k``: output dimension (``None`` allowed for ``"identity"``). Options: ``block_size`` (columns
    per generated block), ``cache_bytes`` (cache budget for generated blocks, default 256 MiB), and
    ``s`` (nonzeros per coordinate, ``"sjlt"`` only, default 4).
    """
    if not isinstance(kind, str):
        raise TypeError(f"projector kind must be a string, got {kind!r}")
    key = _ALIASES.get(kind.lower(), kind.lower())
    if key == "factorized":  # its own module: it comes with a hook-based harvest engine
        from .factorized import FactorizedProjector

        if k is None:
            raise ValueError("projector kind 'factorized' needs a budget k per parameter")
        if opts.get("draws", 1) != 1:
            raise ValueError("proj_draws > 1 needs a per-sample projection (sjlt, gaussian, rademacher), not "
                             "'factorized'")
        return FactorizedProjector(param_shapes, k, seed, **{o: v for o, v in opts.items()
                                                             if o not in ("block_size", "draws")})
    if key not in _CLASSES:
        raise ValueError(f"unknown projector kind {kind!r}; choose one of {KINDS} (or 'none')")
    if key not in ("sjlt", "tensorsketch") and "s" in opts:
        raise ValueError(f"option s= applies to the 'sjlt' and 'tensorsketch' projectors only, not {kind!r}")
    draws = opts.pop("draws", 1)
    if key == "identity":
        return IdentityProjector(param_shapes, k, seed)
    if k is None:
        raise ValueError(f"projector kind {kind!r} needs an output dimension k")
    if draws != 1:
        from .draws import DrawsProjector  # several projectors side by side, built by this function

        return DrawsProjector(key, param_shapes, k, seed, draws=draws, **opts)
    return _CLASSES[key](param_shapes, k, seed, **opts)


def projector_from_config(config: Mapping, **runtime_opts) -> Projector:
    """Rebuild the projector described by ``Projector.config()`` (``cache_bytes`` may be overridden)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"projector config must be a dict, got {type(config).__name__}")
    for field in ("kind", "k", "seed", "params"):
        if field not in config:
            raise ValueError(f"projector config is missing {field!r}: {dict(config)!r}")
    if config.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise ValueError(
            f"projector config version {config.get('version')!r} is not supported (expected {CONFIG_VERSION})"
        )
    shapes = [(n, tuple(s)) for n, s in config["params"]]
    opts = dict(runtime_opts)
    if config["kind"] == "factorized":
        return make_projector("factorized", shapes, config["k_param"], config["seed"], **opts)
    if config["kind"] != "identity":
        opts.setdefault("block_size", config.get("block_size"))
    if config["kind"] in ("sjlt", "tensorsketch"):
        opts["s"] = config.get("s", 4)
    if config.get("draws", 1) > 1:  # a config without draw_seeds is an older store's: consecutive seeds
        seeds = config.get("draw_seeds") or [config["seed"] + i for i in range(config["draws"])]
        return make_projector(config["kind"], shapes, config["k_draw"], config["seed"], draws=config["draws"],
                              seeds=seeds, **opts)
    return make_projector(config["kind"], shapes, config["k"], config["seed"], **opts)


def param_shapes_of(model: torch.nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Size]:
    """``{name: shape}`` for the named parameters of ``model`` (all with requires_grad if ``names`` is None)."""
    params = dict(model.named_parameters())
    if names is None:
        return {n: p.shape for n, p in params.items() if p.requires_grad}
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"model has no parameter(s) {unknown[:5]}; known: {list(params)[:10]}")
    return {n: params[n].shape for n in names}
