"""The sparse sign sketch (SJLT): each coordinate has ``s`` nonzeros +-1/sqrt(s), the a-th of them in
its own row band ``[a k/s, (a+1) k/s)``, so the rows of a column are distinct (see :mod:`.projection`)."""

from __future__ import annotations

import math
import warnings

import torch

from .projection import DEFAULT_CACHE_BYTES, Projector

__all__ = ["SJLTProjector"]

_SJLT_BLOCK_COLUMNS = 2**20  # columns per seeded block (part of the map: recorded in the config)
_SJLT_SUB_COLUMNS, _SJLT_SUB_ROWS = 2**12, 16  # how a block is applied (not part of the map)


class SJLTProjector(Projector):
    """Sparse sign sketch with ``s`` nonzeros +-1/sqrt(s) per coordinate, in distinct row bands."""

    kind = "sjlt"

    def __init__(self, param_shapes, k, seed=0, *, s: int = 4, block_size=None, cache_bytes=DEFAULT_CACHE_BYTES):
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"s (nonzeros per coordinate) must be a positive int, got {s!r}")
        if isinstance(k, int) and s > k:
            raise ValueError(f"s={s} nonzeros per coordinate need k >= s, got k={k}")
        self.s = s
        super().__init__(param_shapes, k, seed, block_size=block_size, cache_bytes=cache_bytes)

    def _default_block_size(self) -> int:
        return _SJLT_BLOCK_COLUMNS

    def _extra_config(self) -> dict:
        return {"s": self.s}

    def buckets(self, name: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 row indices ``(cols, s)`` and int8 signs ``(cols, s)`` of one block's columns."""
        c0, c1 = self.blocks(name)[block]
        cols = c1 - c0
        g = self._generator(name, block)
        rows = torch.empty(cols, self.s, dtype=torch.int32)
        for a in range(self.s):
            lo, hi = a * self.k // self.s, (a + 1) * self.k // self.s
            rows[:, a] = torch.randint(lo, hi, (cols,), generator=g, dtype=torch.int32)
        signs = torch.randint(0, 2, (cols, self.s), generator=g, dtype=torch.int8).mul_(2).sub_(1)
        return rows, signs

    def _csr_parts(self, name: str, block: int, device) -> list:
        """The block's matrix as CSR pieces of at most ``_SJLT_SUB_COLUMNS`` columns each."""
        rows, signs = self.buckets(name, block)
        return [self._csr(rows[c:c + _SJLT_SUB_COLUMNS], signs[c:c + _SJLT_SUB_COLUMNS], device)
                for c in range(0, rows.shape[0], _SJLT_SUB_COLUMNS)]

    def _csr(self, rows: torch.Tensor, signs: torch.Tensor, device) -> torch.Tensor:
        cols = rows.shape[0]
        flat_rows = rows.reshape(-1).to(torch.int64)
        order = torch.argsort(flat_rows, stable=True)
        col_idx = torch.arange(cols, dtype=torch.int32).repeat_interleave(self.s)[order]
        values = signs.reshape(-1)[order].to(torch.float32) / math.sqrt(self.s)
        counts = torch.bincount(flat_rows, minlength=self.k)
        crow = torch.zeros(self.k + 1, dtype=torch.int32)
        crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            m = torch.sparse_csr_tensor(crow, col_idx, values, (self.k, cols), check_invariants=False)
            return m.to(device)

    def _apply_block(self, x, name, block, c0, c1):
        parts = self._cached((name, block, str(x.device)), lambda: self._csr_parts(name, block, x.device))
        # In pieces of _SJLT_SUB_COLUMNS columns and _SJLT_SUB_ROWS samples: the sparse product
        # then reads a slice of x that stays in cache (measured 3-5x faster per sample on CPU than
        # one product over the whole block; benchmarks/harvest_throughput.py).
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for j, m in enumerate(parts):
                if m.dtype != x.dtype:
                    m = m.to(x.dtype)
                piece = x[:, j * _SJLT_SUB_COLUMNS: (j + 1) * _SJLT_SUB_COLUMNS]
                for r in range(0, x.shape[0], _SJLT_SUB_ROWS):
                    out[r: r + _SJLT_SUB_ROWS] += (m @ piece[r: r + _SJLT_SUB_ROWS].T).T
        return out
