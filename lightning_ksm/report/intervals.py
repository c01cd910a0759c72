"""The report's bootstrap intervals as a CSV file (``intervals.csv``), next to the JSON copy.

Long format, one row per readout: ``kind,target,task_i,task_j,method,estimate,lo,hi``; ``kind`` is
``score`` (task_i only), ``interaction`` (i < j, for the targets whose interactions were
bootstrapped), ``best_subset`` (task_i = the subset, ';'-joined) or ``group`` (target = the served
targets, ';'-joined). Floats use Python's round-trip ``repr``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["intervals_csv"]


def _rows(report: "AttributionReport"):
    for method in report.methods:
        iv = report.score_interval(method)
        if iv is None:
            continue
        sc = report.scores[method]
        for t, target in enumerate(report.target_names):
            for k, task in enumerate(report.task_names):
                yield ["score", target, task, "", method, sc[k, t], iv[0, k, t], iv[1, k, t]]
    inter = report.intervals.get("interactions") or {}
    iu, ju = np.triu_indices(report.n_tasks, k=1)
    for target in inter.get("targets", []):
        t = report.target_index(target)
        iv = report.interaction_interval(target)
        for i, j in zip(iu.tolist(), ju.tolist()):
            yield ["interaction", target, report.task_names[i], report.task_names[j], "",
                   report.interactions[t, i, j], iv[0, i, j], iv[1, i, j]]
    for e in report.best_subsets:
        if "predicted_interval" in e:
            yield ["best_subset", e["target"], ";".join(e["tasks"]), "", "", e.get("predicted_loss"),
                   *e["predicted_interval"]]
    for e in report.groups:
        if "predicted_interval" in e:
            yield ["group", ";".join(e.get("serves", [])), ";".join(e["tasks"]), "", "", e.get("predicted_loss"),
                   *e["predicted_interval"]]


def intervals_csv(report: "AttributionReport", field) -> bytes | None:
    """The CSV bytes, or None when the report has no intervals. ``field`` quotes one text cell
    (the CSV writer's own, so the formula-injection guard applies)."""
    if not report.intervals:
        return None
    lines = ["kind,target,task_i,task_j,method,estimate,lo,hi"]
    for row in _rows(report):
        text = [field(str(x)) for x in row[:5]]
        nums = [repr(float(x)) if x is not None else "" for x in row[5:]]
        lines.append(",".join(text + nums))
    return ("\n".join(lines) + "\n").encode("utf-8")
