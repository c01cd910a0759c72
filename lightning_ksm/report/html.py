"""Render an :class:`~lightning_ksm.report.AttributionReport` as one self-contained HTML page.

The page has no scripts, no external CSS/fonts/images and makes no network request: heatmaps are
inline SVG (drawn by :mod:`.svg`), styles are one inline ``<style>`` block, and a
Content-Security-Policy meta tag forbids everything else. Every string that comes from the report
(task and target names, config values, ...) goes through :func:`html.escape`, so a task named
``<script>`` is shown, never run.

Colour: one diverging scale centred at 0 for both heatmaps, where **blue is good for the target**
and red is bad. For scores, blue = positive (the task helps); for interactions, blue = negative
(synergy: the pair helps more together) and red = positive (antagonism / redundancy).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .svg import color_limit, diverging_color, e, heatmap_svg
from .text import format_number

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["render_html", "diverging_color"]

MAX_INTERACTION_TASKS = 60  # a K x K matrix beyond this is unreadable and makes the page huge


def _num(v: Any, spec: str = ".4g") -> str:
    """A number (or any value) as escaped HTML text."""
    return e(format_number(v, spec))


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0 1em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow:auto;max-width:100%;border:1px solid #eee;padding:.5em}
.note{color:#555;font-size:.9em}.bar{display:inline-block;height:.8em;vertical-align:middle}
.good{color:#21509c}.bad{color:#a4161f}
pre{background:#f7f7f7;padding:.7em;overflow:auto;font-size:.85em}
summary{cursor:pointer;font-weight:600;margin:.4em 0}
"""


def _table(header: list, rows: list, num_cols: set = frozenset()) -> str:
    """``header`` cells are escaped here; ``rows`` cells must already be HTML."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if j in num_cols else f"<td>{c}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tasks_html(tasks: list) -> str:
    return ", ".join(e(t) for t in tasks) if tasks else "<em>(none)</em>"


def _json_pre(obj: Any) -> str:
    return "<pre>" + e(json.dumps(obj, indent=2, ensure_ascii=False, default=str)) + "</pre>"


def _extra_keys(entry: dict, known: set) -> str:
    rest = {k: v for k, v in entry.items() if k not in known}
    return e(json.dumps(rest, ensure_ascii=False, default=str)) if rest else ""


_FIT_EXPLAIN = {
    "heldout_lds": "Linear datamodeling score on held-out subsets: the Spearman rank correlation between "
    "the surrogate's predicted loss and the GradEx loss, over task subsets the surrogate was not fitted "
    "on (mean over targets). 1 = it orders subsets perfectly, 0 = no better than chance.",
    "heldout_residual_error": "How far the surrogate's predictions are from the GradEx losses on "
    "held-out subsets (lower is better).",
    "n_train_subsets": "Number of task subsets the surrogate was fitted on.",
    "n_heldout_subsets": "Number of task subsets kept aside to check the fit.",
    "surrogate": "The fitted surrogate model and its chosen hyperparameters.",
}


def _fit_section(report: "AttributionReport") -> str:
    fq = report.fit_quality
    out = ["<h2>Surrogate fit quality</h2>"]
    lds = fq.get("heldout_lds")
    if isinstance(lds, (int, float)) and not isinstance(lds, bool) and math.isfinite(lds):
        if lds >= 0.7:
            verdict = (
                "The surrogate ranks held-out subsets well, so the scores below summarize the GradEx losses faithfully."
            )
        elif lds >= 0.4:
            verdict = (
                "The surrogate ranks held-out subsets moderately well: trust large score differences more than "
                "small ones."
            )
        else:
            verdict = (
                "The surrogate ranks held-out subsets poorly: treat the scores with caution "
                "(more subsets or another surrogate may help)."
            )
        out.append(
            f"<p>Held-out LDS {_num(lds, '.3f')}. {e(verdict)} "
            "(Rule of thumb: \u2265 0.7 good, 0.4\u20130.7 moderate.)</p>"
        )
    out.append(
        '<p class="note">This checks the surrogate against GradEx estimates of the loss, not against real '
        "retraining; GradEx itself is a first-order approximation around the snapshot weights.</p>"
    )
    if fq:
        rows = []
        for k, v in fq.items():
            val = _json_pre(v) if isinstance(v, (dict, list)) else _num(v)
            rows.append([e(k), val, e(_FIT_EXPLAIN.get(k, ""))])
        out.append(_table(["measure", "value", "meaning"], rows))
    else:
        out.append("<p><em>No fit-quality measures were recorded.</em></p>")
    return "".join(out)


def _ranked_section(report: "AttributionReport") -> str:
    methods = list(report.methods)
    dm = report.default_method
    out = [
        "<h2>Ranked tasks per target</h2>",
        f'<p class="note">Sorted by the <b>{e(dm)}</b> score. Score = predicted increase of the target '
        "loss when the task is removed: <span class=good>positive = the task helps</span>, "
        "<span class=bad>negative = it hurts</span>.</p>",
    ]
    d = report.target_index(None)
    for t in [d] + [c for c in range(report.n_targets) if c != d]:
        target = report.target_names[t]
        vmax = color_limit(report.scores[dm][:, t])
        rows = []
        for rank, (task, v) in enumerate(report.ranked(t, dm), 1):
            k = report.task_index(task)
            width = 0 if not math.isfinite(v) else round(60 * (abs(v) / vmax))
            bar = f'<span class="bar" style="width:{width}px;background:{diverging_color(v, vmax)}"></span>'
            cells = [str(rank), e(task)] + [_num(report.scores[m][k, t], ".6g") for m in methods] + [bar]
            rows.append(cells)
        header = ["rank", "task"] + [m + (" (sorted)" if m == dm else "") for m in methods] + [""]
        table = _table(header, rows, num_cols=set(range(2, 2 + len(methods))) | {0})
        opened = " open" if t == d else ""
        out.append(f"<details{opened}><summary>target {e(target)}</summary>{table}</details>")
    return "".join(out)


def _pairs_section(report: "AttributionReport", t: int) -> str:
    out = []
    for kind, words in (("synergy", "help more together"), ("antagonism", "are redundant or conflict")):
        pairs = report.top_pairs(10, t, kind)
        if pairs:
            rows = [[e(a), e(b), _num(v, ".6g")] for a, b, v in pairs]
            out.append(f"<h3>Strongest {kind} (pairs that {e(words)})</h3>")
            out.append(_table(["task i", "task j", "interaction"], rows, num_cols={2}))
    return "".join(out)


def _subsets_section(report: "AttributionReport") -> str:
    out = ["<h2>Best task subsets</h2>"]
    if not report.best_subsets:
        return out[0] + "<p><em>None computed.</em></p>"
    out.append(
        '<p class="note">For each target, the subset of source tasks with the lowest predicted target '
        "loss (of the given size). \u201cexhaustive\u201d: every subset of that size was scored; "
        "\u201cheuristic\u201d: a search that may miss the optimum.</p>"
    )
    known = {"target", "size", "tasks", "predicted_loss", "full_set_loss", "exact"}
    rows = []
    for entry in report.best_subsets:
        pl, fl = entry.get("predicted_loss"), entry.get("full_set_loss")
        gain = ""
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (pl, fl)):
            gain = _num(fl - pl, "+.4g")
        exact = entry.get("exact")
        rows.append([
            e(entry["target"]), str(len(entry["tasks"])), _tasks_html(entry["tasks"]), _num(pl), _num(fl), gain,
            "" if exact is None else ("exhaustive" if exact else "heuristic"), _extra_keys(entry, known),
        ])
    out.append(_table(
        ["target", "size", "tasks", "predicted loss", "all-tasks loss", "improvement", "search", "other"],
        rows, num_cols={1, 3, 4, 5},
    ))
    return "".join(out)


def _groups_section(report: "AttributionReport") -> str:
    out = ["<h2>Recommended co-training groups</h2>"]
    if not report.groups:
        return out[0] + "<p><em>None computed.</em></p>"
    out.append('<p class="note">Tasks the surrogate predicts are best trained together.</p>')
    rows = []
    for g, entry in enumerate(report.groups, 1):
        pl = entry.get("predicted_loss")
        if isinstance(pl, dict):
            pl_html = "<br>".join(f"{e(k)}: {_num(v)}" for k, v in pl.items())
        else:
            pl_html = _num(pl)
        rows.append([str(g), _tasks_html(entry["tasks"]), pl_html, _extra_keys(entry, {"tasks", "predicted_loss"})])
    out.append(_table(["group", "tasks", "predicted loss", "other"], rows, num_cols={0}))
    return "".join(out)


def _data_section(report: "AttributionReport") -> str:
    if report.subsets is None and report.losses is None:
        return ""
    out = ["<h2>Surrogate training data</h2>"]
    if report.subsets is not None:
        sizes = report.subsets.sum(axis=1)
        out.append(
            f"<p>{len(report.subsets)} task subsets; tasks per subset: min {int(sizes.min()) if len(sizes) else 0}, "
            f"mean {_num(float(sizes.mean()) if len(sizes) else 0.0, '.3g')}, max {int(sizes.max()) if len(sizes) else 0} "
            f"(of {report.n_tasks}). Stored in <code>subsets.npy</code>.</p>"
        )
    if report.losses is not None and len(report.losses):
        rows = []
        for t, target in enumerate(report.target_names[:50]):
            col = report.losses[:, t]
            rows.append([e(target), _num(float(np.nanmin(col))), _num(float(np.nanmean(col))), _num(float(np.nanmax(col)))])
        more = "" if report.n_targets <= 50 else f"<p class=note>({report.n_targets - 50} more targets in losses.npy)</p>"
        out.append("<p>GradEx loss F^ on those subsets (stored in <code>losses.npy</code>):</p>")
        out.append(_table(["target", "min", "mean", "max"], rows, num_cols={1, 2, 3}) + more)
    return "".join(out)


def _interaction_tasks(mat: np.ndarray) -> list:
    """Indices (in task order) of the tasks drawn in the interaction heatmap: all of them up to
    ``MAX_INTERACTION_TASKS``, else those with the largest |interaction| with any partner."""
    K = mat.shape[0]
    if K <= MAX_INTERACTION_TASKS:
        return list(range(K))
    a = np.abs(np.where(np.isfinite(mat), mat, 0.0))
    np.fill_diagonal(a, 0.0)
    strongest = np.argsort(-a.max(axis=1), kind="stable")[:MAX_INTERACTION_TASKS]
    return sorted(int(k) for k in strongest)


def render_html(report: "AttributionReport") -> str:
    """The whole page as a string."""
    K, T = report.n_tasks, report.n_targets
    dm = report.default_method
    d = report.target_index(None)
    dname = report.target_names[d]
    body = [
        f"<h1>Task attribution report</h1>",
        f"<p>{K} source tasks \u00d7 {T} targets \u00b7 method <b>{e(dm)}</b> \u00b7 created {e(report.created_at)}</p>",
        "<h2>How to read this page</h2>",
        "<ul><li><b>Score</b> of a source task for a target: the predicted <i>increase</i> of the target "
        "loss when that task is removed from training. <span class=good>Score &gt; 0: the task helps</span>; "
        "<span class=bad>score &lt; 0: it hurts</span>.</li>"
        "<li><b>Interaction</b> of two tasks: g(all) \u2212 g(all without i) \u2212 g(all without j) + "
        "g(all without i and j), where g is the surrogate's predicted loss. "
        "<span class=good>&lt; 0: synergy</span> (removing both hurts more than the two removals "
        "separately: the pair helps more together); <span class=bad>&gt; 0: antagonism or redundancy</span> "
        "(either task alone gives most of the benefit, or they conflict).</li>"
        "<li>Colours: <span class=good>blue is good for the target</span>, <span class=bad>red is bad</span>, "
        "white is neutral. Hover a cell for its exact value.</li></ul>",
    ]
    helpers = report.top_helpers(3)
    hurters = report.top_hurters(3)
    summary = []
    if helpers:
        listed = ", ".join(f"{e(t)} ({_num(v, '+.3g')})" for t, v in helpers)
        summary.append(f"Most helpful for target {e(dname)}: {listed}.")
    if hurters:
        summary.append("Most harmful: " + ", ".join(f"{e(t)} ({_num(v, '+.3g')})" for t, v in hurters) + ".")
    if summary:
        body.append("<p>" + " ".join(summary) + "</p>")

    # score heatmap: source task x target
    sc = report.scores[dm]
    body.append(f"<h2>Attribution scores ({e(dm)})</h2>")
    body.append(
        '<div class="scroll">'
        + heatmap_svg(
            sc, list(report.task_names), list(report.target_names),
            cell_class="ksm-cell",
            tooltip=lambda i, j, v: f"{report.task_names[i]} \u2192 {report.target_names[j]}: {dm} score {v:.6g}",
            good_sign=1.0, legend_left="hurts", legend_right="helps",
            title=f"Attribution scores ({dm}): source task \u00d7 target", gid="ksm-grad-scores",
            cell_w=64.0, cell_h=22.0, show_values=K * T <= 2000,
        )
        + "</div>"
    )

    if report.interactions is not None:
        body.append(f"<h2>Pairwise interactions (target {e(dname)})</h2>")
        note = "" if T == 1 else (
            f" Shown for target <b>{e(dname)}</b>; the other {T - 1} target(s) are in <code>interactions.csv</code>."
        )
        body.append(
            f'<p class="note">Blue: synergy (interaction &lt; 0); red: antagonism / redundancy (&gt; 0).{note}</p>'
        )
        full = report.interactions[d]
        shown = _interaction_tasks(full)
        if len(shown) < K:
            body.append(
                f'<p class="note">{K} tasks are too many for one readable matrix: showing the {len(shown)} '
                "tasks with the strongest interactions (largest |interaction| with any partner).</p>"
            )
        cell = float(max(8, min(28, 640 // max(len(shown), 1))))
        mat = full[np.ix_(shown, shown)]
        names = [report.task_names[k] for k in shown]
        body.append(
            '<div class="scroll">'
            + heatmap_svg(
                mat, names, names,
                cell_class="ksm-icell",
                tooltip=lambda i, j, v: (
                    f"{names[i]} + {names[j]} ({dname}): interaction {v:.6g}"
                    + (" (synergy)" if v < 0 else " (antagonism)" if v > 0 else "")
                ),
                good_sign=-1.0, legend_left="synergy", legend_right="antagonism",
                title=f"Pairwise interactions for target {dname}", gid="ksm-grad-inter",
                cell_w=cell, cell_h=cell, show_values=False, skip_diagonal=True,
                row_ids=shown, col_ids=shown,
            )
            + "</div>"
        )
        body.append(_pairs_section(report, d))

    body.append(_ranked_section(report))
    body.append(_subsets_section(report))
    body.append(_groups_section(report))
    body.append(_fit_section(report))
    body.append(_data_section(report))

    body.append("<h2>Run details</h2>")
    if report.timings:
        rows = [[e(k), _num(v, ".3f")] for k, v in report.timings.items()]
        body.append("<h3>Timings (seconds)</h3>" + _table(["stage", "seconds"], rows, num_cols={1}))
    if report.seeds:
        body.append("<h3>Seeds</h3>" + _json_pre(report.seeds))
    body.append("<h3>Versions</h3>")
    body.append(_table(["package", "version"], [[e(k), e(v)] for k, v in report.versions.items()]))
    body.append("<h3>Configuration</h3>" + (_json_pre(report.config) if report.config else "<p><em>(empty)</em></p>"))

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>lightning-ksm report: {e(dname)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
