"""Inline SVG heatmaps and their colour scale, for the HTML report page.

Colour: one diverging scale centred at 0, where **blue is good for the target** and red is bad
(``good_sign`` says which sign is good). Every label and tooltip goes through :func:`e`
(:func:`html.escape`), so a task named ``<script>`` is shown, never run.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Callable

import numpy as np

__all__ = ["e", "diverging_color", "color_limit", "heatmap_svg"]

_BAD = (178, 24, 43)  # red
_MID = (247, 247, 247)  # near white at 0
_GOOD = (33, 102, 172)  # blue
_NAN = "#bdbdbd"
_LABEL_CHARS = 32  # longer names are cut in labels (full name in the tooltip)
_CHAR_W = 7.0  # rough width of one 12px character, for layout



def e(value: Any) -> str:
    """HTML-escape any value's string form (quotes too, so it is safe in attributes)."""
    return escape(str(value), quote=True)


def diverging_color(value: float, vmax: float, good_sign: float = 1.0) -> str:
    """``#rrggbb`` for ``value`` on a red-white-blue scale over ``[-vmax, vmax]``.

    ``good_sign=+1`` paints positive values blue, ``-1`` paints negative values blue.
    Non-finite values get grey.
    """
    if not math.isfinite(value):
        return _NAN
    t = 0.0 if vmax <= 0 else max(-1.0, min(1.0, value / vmax)) * good_sign
    end = _GOOD if t >= 0 else _BAD
    a = abs(t)
    rgb = [round(m + (x - m) * a) for m, x in zip(_MID, end)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _short(name: str) -> str:
    """``name`` cut to a label's length (the full name goes in the tooltip)."""
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 1] + "\u2026"


def color_limit(values: np.ndarray) -> float:
    """The colour scale's half-width: the largest finite |value|, or 1.0 when there is none > 0."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _legend(x: float, y: float, vmax: float, good_sign: float, left: str, right: str, gid: str,
            ends: tuple | None = None) -> str:
    """A horizontal colour bar from -vmax to +vmax with words at both ends."""
    lo_txt, hi_txt = ends or (format(-vmax, ".3g"), format(vmax, "+.3g"))
    w, h = 220.0, 12.0
    stops = "".join(
        f'<stop offset="{f:.2f}" stop-color="{diverging_color((2 * f - 1) * vmax, vmax, good_sign)}"/>'
        for f in np.linspace(0, 1, 9)
    )
    return (
        f'<defs><linearGradient id="{gid}" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient></defs>'
        f'<g class="ksm-legend" transform="translate({x:.1f},{y:.1f})">'
        f'<rect width="{w}" height="{h}" fill="url(#{gid})" stroke="#999" stroke-width="0.5"/>'
        f'<text x="0" y="{h + 13}" font-size="11">{e(lo_txt)}</text>'
        f'<text x="{w / 2}" y="{h + 13}" font-size="11" text-anchor="middle">0</text>'
        f'<text x="{w}" y="{h + 13}" font-size="11" text-anchor="end">{e(hi_txt)}</text>'
        f'<text x="0" y="{h + 27}" font-size="11">\u2190 {e(left)}</text>'
        f'<text x="{w}" y="{h + 27}" font-size="11" text-anchor="end">{e(right)} \u2192</text>'
        "</g>"
    )


def heatmap_svg(
    values: np.ndarray,
    row_labels: list,
    col_labels: list,
    *,
    cell_class: str,
    tooltip: Callable[[int, int, float], str],
    good_sign: float,
    legend_left: str,
    legend_right: str,
    title: str,
    gid: str,
    cell_w: float,
    cell_h: float,
    show_values: bool,
    skip_diagonal: bool = False,
    row_ids: list | None = None,
    col_ids: list | None = None,
    column_scale: bool = False,
) -> str:
    """An inline ``<svg>`` heatmap; each cell is a ``<rect class=cell_class>`` with a ``<title>``.

    ``column_scale``: one colour scale per column (its largest |value|), so that one column with
    large values does not wash out the others; the legend then reads in units of each column's maximum.

    Cells carry ``data-row``, ``data-col`` (``row_ids``/``col_ids`` when given, e.g. the original
    task indices of a shown sub-matrix, else positions) and ``data-value`` (the exact float ``repr``).
    """
    row_ids = list(range(values.shape[0])) if row_ids is None else row_ids
    col_ids = list(range(values.shape[1])) if col_ids is None else col_ids
    R, C = values.shape
    vmax = color_limit(values if not skip_diagonal else np.where(np.eye(R, C, dtype=bool), np.nan, values))
    col_vmax = [color_limit(values[:, j]) for j in range(C)] if column_scale else [vmax] * C
    row_w = max(len(_short(r)) for r in row_labels) * _CHAR_W + 12
    col_len = max(len(_short(c)) for c in col_labels) * _CHAR_W
    top = col_len * 0.72 + 16  # labels are rotated by 45 degrees
    left = max(row_w, 60.0)
    width = left + C * cell_w + col_len * 0.72 + 20
    height = top + R * cell_h + 60
    width = max(width, left + 240)
    parts = [
        f'<svg class="ksm-heatmap" role="img" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">',
        f"<title>{e(title)}</title>",
    ]
    for j, c in enumerate(col_labels):
        x = left + (j + 0.5) * cell_w
        parts.append(
            f'<text class="ksm-col" font-size="12" transform="translate({x:.1f},{top - 6:.1f}) rotate(-45)">'
            f"<title>{e(c)}</title>{e(_short(c))}</text>"
        )
    for i, r in enumerate(row_labels):
        y = top + (i + 0.5) * cell_h + 4
        parts.append(
            f'<text class="ksm-row" font-size="12" x="{left - 6:.1f}" y="{y:.1f}" text-anchor="end">'
            f"<title>{e(r)}</title>{e(_short(r))}</text>"
        )
    for i in range(R):
        for j in range(C):
            x, y = left + j * cell_w, top + i * cell_h
            if skip_diagonal and i == j:
                parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell_w:.1f}" height="{cell_h:.1f}" fill="#ffffff" '
                    f'stroke="#ddd" stroke-width="0.5"/>'
                )
                continue
            v = float(values[i, j])
            fill = diverging_color(v, col_vmax[j], good_sign)
            parts.append(
                f'<rect class="{cell_class}" data-row="{row_ids[i]}" data-col="{col_ids[j]}" data-value="{e(repr(v))}" '
                f'x="{x:.1f}" y="{y:.1f}" width="{cell_w:.1f}" height="{cell_h:.1f}" fill="{fill}" '
                f'stroke="#fff" stroke-width="0.5"><title>{e(tooltip(i, j, v))}</title></rect>'
            )
            if show_values:
                strong = math.isfinite(v) and abs(v) / col_vmax[j] > 0.6
                parts.append(
                    f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" font-size="10" '
                    f'text-anchor="middle" pointer-events="none" fill="{"#fff" if strong else "#222"}">'
                    f"{e(format(v, '.2g'))}</text>"
                )
    if column_scale:
        parts.append(_legend(left, top + R * cell_h + 12, 1.0, good_sign, legend_left, legend_right, gid,
                             ends=("\u2212max of column", "+max of column")))
    else:
        parts.append(_legend(left, top + R * cell_h + 12, vmax, good_sign, legend_left, legend_right, gid))
    parts.append("</svg>")
    return "".join(parts)
