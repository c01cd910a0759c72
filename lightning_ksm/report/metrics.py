"""The flat ``{name: float}`` metric dict of an :class:`~lightning_ksm.report.AttributionReport` for loggers."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["summary_metrics"]


def _metric_keys(names: list) -> list:
    """Logger-safe metric name parts: [A-Za-z0-9_.-] only, made unique with an index suffix."""
    keys = [re.sub(r"[^A-Za-z0-9_.-]", "_", n) for n in names]
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [k if counts[k] == 1 else f"{k}_{i}" for i, k in enumerate(keys)]


def summary_metrics(report: "AttributionReport", prefix: str = "ksm") -> dict:
    """The logger metrics; see :meth:`AttributionReport.summary_metrics`."""
    out: dict = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return
        if math.isfinite(float(value)):
            out[key] = float(value)

    tkeys = _metric_keys(list(report.task_names))
    gkeys = _metric_keys(list(report.target_names))
    sc = report.scores[report.default_method]
    for t, gk in enumerate(gkeys):
        for k, tk in enumerate(tkeys):
            put(f"{prefix}/score/{gk}/{tk}", sc[k, t])
    for key, value in report.fit_quality.items():
        put(f"{prefix}/fit/{_metric_keys([key])[0]}", value)
    put(f"{prefix}/fit/warnings", len(report.warnings()))  # > 0: read the report's warnings first
    for e in report.best_subsets:
        gk = gkeys[report.target_index(e["target"])]
        put(f"{prefix}/best_subset/{gk}/size_{len(e['tasks'])}/predicted_loss", e.get("predicted_loss"))
    for stage, seconds in report.timings.items():
        put(f"{prefix}/time/{_metric_keys([stage])[0]}", seconds)
    return out
