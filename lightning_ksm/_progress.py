"""Progress bars for the long stages (GradEx, the readouts), shown only when asked for."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it"):
    """A tqdm bar over ``total`` items, or None when ``enabled`` is false (callers check for None)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit=unit)
