"""CPU threads of the numeric stages: pinned for the duration of a stage, then restored.

On a shared or small machine, extra torch / BLAS threads only add synchronisation cost to the
analysis' many small matrix problems (measured: GradEx 3 s with one thread, 11-40 s with the
default threads on 2 shared cores; a 200 x 200 eigendecomposition 100x slower), so the analysis
runs with ``AnalysisConfig.threads`` threads (default 1; 0 leaves the process's settings alone).
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["pinned_threads"]


@contextmanager
def pinned_threads(n: int | None):
    """torch and BLAS/OpenMP limited to ``n`` threads inside the block (``n`` 0 or None: unchanged)."""
    if not n:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        torch.set_num_threads(before)
