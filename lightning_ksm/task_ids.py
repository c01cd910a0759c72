"""Task ids: one normal form (plain ``int`` or ``str``) and one canonical order, shared by the
harvest and the feature store; and de-duplication of samples by their global index."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

__all__ = ["normalize_task_id", "canonical_task_names", "dedup_positions", "POOLED_TARGET"]

# The report's name for the target group of every target sample pooled; no target group may use it.
POOLED_TARGET = "all"


def canonical_task_names(values: Iterable[Any]) -> list:
    """Sorted unique task ids: ints in numeric order, then strings in lexicographic order."""
    uniq = {normalize_task_id(v) for v in values}
    return sorted(uniq, key=lambda v: (isinstance(v, str), v))


def normalize_task_id(value: Any) -> int | str:
    """A task id as a plain ``int`` or ``str`` (numpy/torch scalars converted); others are rejected."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(f"task ids must be ints or strings, got {value!r} ({type(value).__name__})")


def dedup_positions(index: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct value of ``index``, ordered by value."""
    _, first = np.unique(np.asarray(index), return_index=True)
    return first
