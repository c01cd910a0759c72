"""PNG heatmaps of an :class:`~lightning_ksm.report.AttributionReport`, drawn with matplotlib when it is installed."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from .svg import color_limit

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["render_figures"]


def render_figures(report: "AttributionReport", *, required: bool) -> dict:
    """PNG heatmaps as bytes, drawn with matplotlib's object API (no pyplot, no global backend).

    Returns ``{"scores.png": ..., "interactions.png": ...}`` (the latter when the report has
    interactions), or ``{}`` when matplotlib is missing and not ``required``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if required:
            raise ImportError("figures=True needs matplotlib: pip install 'lightning-ksm[plot]'") from None
        return {}

    def heat(values: np.ndarray, rows: list, cols: list, cmap: str, title: str, label: str) -> bytes:
        vmax = color_limit(values)
        h = min(2.0 + 0.25 * len(rows), 40.0)
        w = min(3.0 + 0.6 * len(cols) + 0.08 * max(len(r) for r in rows), 40.0)
        fig = Figure(figsize=(w, h))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        if len(rows) <= 80:
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
        if len(cols) <= 80:
            ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=45, ha="right")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    out = {}
    names = list(report.task_names)
    out["scores.png"] = heat(
        report.scores[report.default_method], names, list(report.target_names), "RdBu",
        f"attribution scores ({report.default_method})", "score (> 0: task helps)",
    )
    if report.interactions is not None:
        t = report.target_index(None)
        mat = report.interactions[t].copy()
        np.fill_diagonal(mat, np.nan)
        out["interactions.png"] = heat(
            mat, names, names, "RdBu_r", f"pairwise interactions, target {report.target_names[t]!r}",
            "interaction (< 0 synergy, > 0 antagonism)",
        )
    return out
