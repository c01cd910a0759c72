"""The tensor sketch: a sparse sign sketch whose hash of a weight entry (i, j) is structured, so the
sketch of an outer product is formed from its two sides without the product.

For a parameter seen as a matrix ``rows x cols`` (``(rows, *rest)``: ``cols = prod(rest)``; a vector:
one row), each of ``s`` bands of width ``w = k / s`` hashes rows and columns separately
(``h_r(i), h_c(j)`` uniform in ``[0, w)``, signs ``s_r(i), s_c(j)``) and sends entry (i, j) to
``band offset + (h_r(i) + h_c(j)) mod w`` with sign ``s_r(i) s_c(j) / sqrt(s)``. That is an SJLT whose
columns are hashed by pairs (Pham & Pagh's tensor sketch), unbiased for inner products, and the sketch
of ``delta a^T`` is the circular convolution of the count sketches of ``delta`` and ``a``: an FFT
product of two ``w``-vectors (:meth:`TensorSketchProjector.outer_part`). The layer-hook harvest
(:mod:`.layerwise`) uses that path, so no per-sample weight gradient is formed; ``project`` applies
the same map to full gradients (the per-sample path, and the tests). The hash tables are
``O(rows + cols)`` per band, seeded by ``(kind, seed, name, band)``.

A preconditioner ``scale`` of a matrix is folded in as its rank-one (Adafactor-style) approximation
``outer(row means, column means) / mean`` (it must factor to keep the sides apart), vectors exactly;
:meth:`effective_scale` returns what was applied (the exact readout uses it).
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch

from .projection import DEFAULT_CACHE_BYTES, Projector, stable_seed

__all__ = ["TensorSketchProjector", "BANDS"]

BANDS = 4  # s, the default number of bands (of width k / s)


class TensorSketchProjector(Projector):
    """Tensor sketch of per-parameter matrices into ``k`` dims, ``s`` bands (see the module docstring)."""

    kind = "tensorsketch"
    structured = True
    row_block_elements = 1 << 22  # project_part's working set: rows per block x samples x k

    def __init__(self, param_shapes, k, seed=0, *, s: int = BANDS, block_size=None, cache_bytes=DEFAULT_CACHE_BYTES):
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"s (bands) must be a positive int, got {s!r}")
        if isinstance(k, int) and (k < s or k % s):
            raise ValueError(f"the tensor sketch needs k to be a multiple of s={s}, got k={k}")
        self.s = s
        super().__init__(param_shapes, k, seed, block_size=1, cache_bytes=cache_bytes)
        self.w = k // s
        self.sides = {n: ((sh[0], self.numels[n] // sh[0]) if len(sh) >= 2 else (1, self.numels[n]))
                      for n, sh in self.param_shapes.items()}
        self._factors: dict = {}  # name -> (row scale, column scale): the rank-one preconditioner

    def _extra_config(self) -> dict:
        return {"s": self.s}

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("block_size", None)
        return cfg

    # -- hashes ----------------------------------------------------------------------------------
    def _hash(self, name: str, side: str, size: int, device):
        """``(buckets (s, size) int64, signs (s, size) float64)`` of one side of a parameter."""
        def make():
            g = torch.Generator(device="cpu")
            g.manual_seed(stable_seed(self.kind, self.seed, name, side))
            buckets = torch.randint(0, self.w, (self.s, size), generator=g)
            signs = torch.randint(0, 2, (self.s, size), generator=g).to(torch.float64).mul_(2).sub_(1)
            return buckets, signs

        b, sg = self._cached((name, side), make)
        return b.to(device), sg.to(device)

    def _count(self, x: torch.Tensor, name: str, side: str) -> torch.Tensor:
        """Count sketches of the last dim of ``x``, every band at once: ``(..., size)`` -> ``(..., s, w)``."""
        b, sg = self._hash(name, side, x.shape[-1], x.device)
        flat = (b + torch.arange(self.s, device=x.device)[:, None] * self.w).reshape(-1)
        values = (x.unsqueeze(-2) * sg.to(x.dtype)).reshape(*x.shape[:-1], -1)
        out = torch.zeros(*x.shape[:-1], self.s * self.w, dtype=x.dtype, device=x.device)
        return out.index_add_(x.dim() - 1, flat, values).view(*x.shape[:-1], self.s, self.w)

    # -- the preconditioner ----------------------------------------------------------------------
    def with_scale(self, scale: Mapping[str, torch.Tensor]) -> "TensorSketchProjector":
        out = copy.copy(self)
        out._factors = {}
        for name in self.param_shapes:
            rows, cols = self.sides[name]
            m = scale[name].detach().to(torch.float64).reshape(rows, cols)
            mean = m.mean().clamp_min(1e-30)
            out._factors[name] = (m.mean(1) / mean.sqrt(), m.mean(0) / mean.sqrt()) if rows > 1 else (None, m[0])
        return out

    def subset(self, names) -> "TensorSketchProjector":
        out = TensorSketchProjector({n: self.param_shapes[n] for n in names}, self.k, self.seed, s=self.s,
                                    cache_bytes=self.cache_bytes)
        out._factors = {n: self._factors[n] for n in names if n in self._factors}
        return out

    def effective_scale(self) -> dict | None:
        """``{name: scale}`` as this sketch applies it (rank-one for matrices), or None."""
        if not self._factors:
            return None
        out = {}
        for name, shape in self.param_shapes.items():
            r, c = self._factors[name]
            out[name] = (c if r is None else torch.outer(r, c)).reshape(shape).float()
        return out

    def _scaled(self, name, left, right):
        if not self._factors:
            return left, right
        r, c = self._factors[name]
        return (left if r is None else left * r.to(left)), right * c.to(right)

    # -- sketches --------------------------------------------------------------------------------
    def _bands(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``(N, s, F)`` spectra -> ``(N, k)``: each band's inverse FFT side by side, times 1/sqrt(s)."""
        out = torch.fft.irfft(spectrum, n=self.w, dim=-1)
        return out.reshape(out.shape[0], self.k) / math.sqrt(self.s)

    def project_part(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.sides[name]
        G = x.reshape(x.shape[0], rows, cols)
        n, spectrum = G.shape[0], None
        # Rows in blocks: each block's column sketches are (N, block, s, F), so memory stays
        # O(N x block x k) for any number of rows (an embedding's vocabulary: 50,257 rows).
        block = max(1, min(rows, self.row_block_elements // max(1, n * self.k)))
        for start in range(0, rows, block):
            part = G[:, start:start + block]
            if self._factors:
                r, c = self._factors[name]
                part = part * (c.to(part) if r is None else torch.outer(r[start:start + block], c).to(part))
            R = torch.fft.rfft(self._count(part, name, "cols"), dim=-1)  # (N, block, s, F)
            term = torch.einsum("nrsf,rsf->nsf", R, self._row_phases(name, rows, start, part.shape[1], part))
            spectrum = term if spectrum is None else spectrum + term
        return self._bands(spectrum)

    def _row_phases(self, name: str, rows: int, start: int, size: int, like: torch.Tensor) -> torch.Tensor:
        """The spectra of rows ``start:start+size``'s signed one-hot count sketches, ``(size, s, F)``:
        row i shifts by its bucket ``h_r(i)`` with sign ``s_r(i)`` (from the hash, not from an
        identity matrix's sketch, which costs ``rows^2``)."""
        b, sg = self._hash(name, "rows", rows, like.device)
        b, sg = b[:, start:start + size].T, sg[:, start:start + size].T.to(like.dtype)  # (size, s)
        f = torch.arange(self.w // 2 + 1, device=like.device, dtype=like.dtype)
        angle = -2 * math.pi * b.to(like.dtype).unsqueeze(-1) * f / self.w
        return torch.polar(torch.ones_like(angle), angle) * sg.unsqueeze(-1)

    def outer_part(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The share of ``sum_l left_l right_l^T`` (left: ``(N, L, rows)``, right: ``(N, L, cols)``)."""
        left, right = self._scaled(name, left, right)
        spectrum = (torch.fft.rfft(self._count(left, name, "rows"), dim=-1)
                    * torch.fft.rfft(self._count(right, name, "cols"), dim=-1)).sum(1)
        return self._bands(spectrum)

    def embedding_part(self, name: str, tokens: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The share of an embedding's per-sample gradient ``sum_l e_{t_l} delta_l^T`` (tokens ``(N, L)``)."""
        b, sg = self._hash(name, "rows", self.sides[name][0], delta.device)
        if self._factors:
            r, c = self._factors[name]
            delta = delta * c.to(delta) * r.to(delta)[tokens].unsqueeze(-1)
        f = torch.arange(self.w // 2 + 1, device=delta.device, dtype=delta.dtype)
        # the spectrum of a signed one-hot at bucket h: sign * exp(-2 pi i f h / w), per band
        angle = -2 * math.pi * b[:, tokens].permute(1, 2, 0).to(delta.dtype).unsqueeze(-1) * f / self.w
        rows = torch.polar(torch.ones_like(angle), angle) * sg[:, tokens].permute(1, 2, 0).to(delta.dtype).unsqueeze(-1)
        return self._bands((rows * torch.fft.rfft(self._count(delta, name, "cols"), dim=-1)).sum(1))
