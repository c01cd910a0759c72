"""Render an :class:`~lightning_ksm.report.AttributionReport` as one self-contained HTML page.

The page has no scripts, no external CSS/fonts/images and makes no network request: heatmaps are
inline SVG (drawn by :mod:`.svg`), styles are one inline ``<style>`` block, and a
Content-Security-Policy meta tag forbids everything else. Every string that comes from the report
(task and target names, config values, ...) goes through :func:`html.escape`, so a task named
``<script>`` is shown, never run.

The page leads with the targets the user cares about (:attr:`AttributionReport.focus_targets`: the
validation groups that are not source tasks), with the tasks that help and the tasks that hurt each
one side by side, intervals, and "within noise" marks; then the co-training groups, best subsets,
the heatmaps, the full rankings and the fit quality. Numbers have 3 significant digits.

Colour: a diverging scale centred at 0, where **blue is good for the target** and red is bad, scaled
per target column in the score heatmap (one scale for all columns would let the largest column wash
out the others). For scores, blue = positive (the task helps); for interactions, blue = negative
(each task's effect is larger with the other present).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .svg import color_limit, diverging_color, e, heatmap_svg
from .text import WITHHELD_LINE, format_number, left_support_reason, strongest_pairs

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["render_html", "diverging_color"]

MAX_INTERACTION_TASKS = 60  # a K x K matrix beyond this is unreadable and makes the page huge


def _num(v: Any, spec: str = ".3g") -> str:
    """A number (or any value) as escaped HTML text."""
    return e(format_number(v, spec))


def _iv(pair, spec: str = ".3g") -> str:
    if not pair or any(x is None for x in pair):
        return ""
    return f'<span class="iv">[{_num(pair[0], spec)}, {_num(pair[1], spec)}]</span>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .3em 0}
table{border-collapse:collapse;margin:.5em 0 1em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow:auto;max-width:100%;border:1px solid #eee;padding:.5em}
.note{color:#555;font-size:.9em}.bar{display:inline-block;height:.8em;vertical-align:middle}
.good{color:#21509c}.bad{color:#a4161f}.iv{color:#666;font-size:.9em}.noise{color:#888;font-style:italic}
.side{display:flex;flex-wrap:wrap;gap:1.5em}.side>div{flex:1 1 320px;min-width:0}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
table.kv td:first-child{white-space:nowrap;color:#444}
summary{cursor:pointer;font-weight:600;margin:.4em 0}
"""


def _table(header: list, rows: list, num_cols: set = frozenset(), cls: str = "") -> str:
    """``header`` cells are escaped here; ``rows`` cells must already be HTML."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if j in num_cols else f"<td>{c}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tasks_html(tasks: list) -> str:
    return ", ".join(e(t) for t in tasks) if tasks else "<em>(none)</em>"


def _flat(obj: Any, prefix: str = "") -> list:
    """``[(dotted key, scalar)]`` of a nested dict / list, for key-value tables (no raw JSON)."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [(prefix, "{}")]
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = []
        for i, v in enumerate(obj):
            out += _flat(v, f"{prefix}[{i}]")
        return out
    if isinstance(obj, list):
        return [(prefix, ", ".join(format_number(v, ".3g") for v in obj))]
    return [(prefix, obj)]


def _kv_table(obj: dict) -> str:
    rows = [[e(k), _num(v)] for k, v in _flat(obj)]
    return _table(["setting", "value"], rows, cls="kv")


_FIT_EXPLAIN = {
    "heldout_lds": "Linear datamodeling score: the Spearman rank correlation between the surrogate's predicted loss and the outcome it was "
    "fitted on, over task subsets it was not fitted on (mean over targets). 1 = it orders subsets "
    "perfectly, 0 = no better than chance.",
    "heldout_residual_error": "Squared error of the surrogate's held-out predictions over the outcomes' "
    "variance (0 = exact, 1 = no better than predicting the mean).",
    "linear_heldout_lds": "The same LDS for the linear surrogate (a baseline).",
    "linear_heldout_residual_error": "The same residual error for the linear surrogate.",
    "n_train_subsets": "Task subsets the surrogate was fitted on (for the held-out check).",
    "n_heldout_subsets": "Task subsets kept aside to check the fit.",
    "surrogate": "The fitted surrogate and its chosen hyperparameters.",
    "support": "Where best subsets and groups were searched: subset sizes and Hamming distance to the "
    "fitted subsets.",
    "loss_lower_bound": "The lowest loss possible; no prediction below it is shown or recommended.",
    "gradex_converged": "Subsets whose GradEx solve converged.",
    "gradex_loss": "The loss GradEx linearizes.",
    "estimator": "How F^(s) was estimated: simulate (the recorded run's optimizer on the linearized model) "
    "or proximal.",
    "gradex_adam_as": "What an Adam-type optimizer became in the simulation (preconditioned: features "
    "harvested with the run's second moments).",
    "gradex_calibrate": "The constant taken from the observed all-tasks run (effect: estimated changes from "
    "W0 scaled to the observed all-tasks loss; rankings unchanged).",
    "gradex_steps": "Optimizer steps simulated: the fewest and most of a subset, and the all-tasks run's (the "
    "watched run's steps).",
    "gradex_exact_readout": "Target columns whose first-order loss change was read exactly, without the "
    "random projection.",
    "gradex_effect_scale": "Per target column, the factor of the effect calibration (none: not applied).",
    "gradex_all_tasks_change": "Per target column, its W0 loss and the change from W0 of the linearized "
    "all-tasks run (estimated) and of the watched run (observed).",
    "linear_regime": "False when the linearized all-tasks run does not follow the watched run (the "
    "other direction, or more than 3x off): the estimated losses are not what training gives; check by retraining.",
    "run_diverged": "True when the watched run diverged (NaN or inf loss or weights): GradEx used the proximal "
    "solve at W0, with no calibration from the run's outcome.",
}


def _fit_verdict(fq: dict) -> str:
    lds, res = fq.get("heldout_lds"), fq.get("heldout_residual_error")
    if not (isinstance(lds, (int, float)) and not isinstance(lds, bool) and math.isfinite(lds)):
        return ""
    res_ok = isinstance(res, (int, float)) and not isinstance(res, bool) and math.isfinite(res)
    if lds >= 0.7 and (not res_ok or res <= 0.1):
        verdict = "The surrogate ranks held-out subsets well and predicts their losses closely."
    elif lds >= 0.7:
        verdict = (f"The surrogate ranks held-out subsets well, but its predicted values are off (residual "
                   f"error {format_number(res, '.3g')}): trust orders and signs more than sizes.")
    elif lds >= 0.4:
        verdict = ("The surrogate ranks held-out subsets moderately well: trust large score differences more "
                   "than small ones.")
    else:
        verdict = ("The surrogate ranks held-out subsets poorly: treat the scores with caution (more subsets "
                   "or another surrogate may help).")
    return (f"<p>Held-out LDS {_num(lds, '.3f')}"
            + (f", residual error {_num(res)}" if res_ok else "")
            + f". {e(verdict)} (Rule of thumb: LDS \u2265 0.7 good, 0.4\u20130.7 moderate.)</p>")


def _fit_section(report: "AttributionReport") -> str:
    fq = report.fit_quality
    out = ["<h2>Surrogate fit quality</h2>", _fit_verdict(fq),
           '<p class="note">This checks the surrogate against the outcomes it was fitted on (GradEx estimates '
           "or measured losses), not against real retraining; GradEx itself is a first-order approximation "
           "around the snapshot weights.</p>"]
    if not fq:
        return "".join(out) + "<p><em>No fit-quality measures were recorded.</em></p>"
    rows = []
    for k, v in fq.items():
        if k in ("notes", "warnings"):  # listed below, in full
            continue
        if isinstance(v, dict):
            val = ", ".join(f"{e(a)}={_num(b)}" for a, b in _flat(v))
        elif isinstance(v, list):
            val = e(", ".join(format_number(x, ".3g") for x in v))
        else:
            val = _num(v)
        rows.append([e(k), val, e(_FIT_EXPLAIN.get(k, ""))])
    out.append(_table(["measure", "value", "meaning"], rows))
    notes = list(fq.get("warnings") or []) + list(fq.get("notes") or [])
    if notes:
        out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


def _score_rows(report, t, tasks, iv):
    dm = report.default_method
    rows = []
    for task, v in tasks:
        k = report.task_index(task)
        cells = [e(task), _num(v, "+.3g")]
        if iv is not None:
            lo, hi = iv[:, k, t]
            cells.append(_iv((lo, hi), "+.3g"))
            cells.append('<span class="noise">within noise</span>' if lo <= 0 <= hi else "clear")
        rows.append(cells)
    header = ["task", f"{dm} score"] + (["interval", "sign"] if iv is not None else [])
    return header, rows


def _focus_section(report: "AttributionReport", t: int) -> str:
    name = report.target_names[t]
    dm = report.default_method
    iv = report.score_interval(dm)
    ranked = report.ranked(t, dm)
    helps = [(a, v) for a, v in ranked if v > 0]
    hurts = [(a, v) for a, v in reversed(ranked) if v < 0]
    out = [f"<h2>Target {e(name)}</h2>", '<div class="side">']
    for title, cls, items, empty in (("Tasks that help", "good", helps, "no task helps this target"),
                                     ("Tasks that hurt (dropping them should help)", "bad", hurts,
                                      "no task hurts this target")):
        out.append(f'<div><h3 class="{cls}">{e(title)}</h3>')
        if items:
            header, rows = _score_rows(report, t, items[:10], iv)
            out.append(_table(header, rows, num_cols={1, 2}))
            if len(items) > 10:
                out.append(f'<p class="note">{len(items) - 10} more in the full ranking below.</p>')
        else:
            out.append(f"<p><em>{e(empty)}</em></p>")
        out.append("</div>")
    out.append("</div>")
    pairs = strongest_pairs(report, t, 6)
    if pairs:
        rows = []
        for i, j, v, lo, hi, label, sentence, noise in pairs:
            rows.append([e(report.task_names[i]), e(report.task_names[j]), _num(v, "+.3g"),
                         _iv((lo, hi), "+.3g") + (' <span class="noise">within noise</span>' if noise else ""),
                         f"<b>{e(label)}</b>: {e(sentence)}"])
        out.append("<h3>Strongest interactions</h3>")
        out.append(_table(["task i", "task j", "interaction", "interval", "meaning"], rows, num_cols={2}))
    for entry in report.best_subsets:
        if entry.get("target") == name:
            out.append("<h3>Best training subset for this target</h3>" + _subset_table(report, [entry]))
    return "".join(out)


def _ranked_section(report: "AttributionReport", order: list) -> str:
    methods = list(report.methods)
    dm = report.default_method
    iv = report.score_interval(dm)
    out = [
        "<h2>Ranked tasks per target</h2>",
        f'<p class="note">Sorted by the <b>{e(dm)}</b> score. Score = predicted increase of the target '
        "loss when the task is removed: <span class=good>positive = the task helps</span>, "
        "<span class=bad>negative = it hurts</span>.</p>" if not report.withheld else
        f'<p class="bad">{e(WITHHELD_LINE)}</p>',
    ]
    for t in order:
        target = report.target_names[t]
        vmax = color_limit(report.scores[dm][:, t])
        rows = []
        for rank, (task, v) in enumerate(report.ranked(t, dm), 1):
            k = report.task_index(task)
            width = 0 if not math.isfinite(v) else round(60 * (abs(v) / vmax))
            # withheld: the scores are an order, not sizes, so no bar suggests one
            bar = "" if report.withheld else \
                f'<span class="bar" style="width:{width}px;background:{diverging_color(v, vmax)}"></span>'
            cells = [str(rank), e(task)] + [_num(report.scores[m][k, t], "+.3g") for m in methods]
            if iv is not None:
                lo, hi = iv[:, k, t]
                cells.append(_iv((lo, hi), "+.3g") + (' <span class="noise">~</span>' if lo <= 0 <= hi else ""))
            rows.append(cells + [bar])
        header = ["rank", "task"] + [m + (" (sorted)" if m == dm else "") for m in methods] \
            + (["interval"] if iv is not None else []) + [""]
        table = _table(header, rows, num_cols=set(range(2, 2 + len(methods))) | {0})
        opened = " open" if t == order[0] else ""
        out.append(f"<details{opened}><summary>target {e(target)}</summary>{table}</details>")
    return "".join(out)


def _subset_table(report: "AttributionReport", entries: list) -> str:
    gradex = any("gradex_loss" in x for x in entries)
    rows = []
    for entry in entries:
        pl, fl = entry.get("predicted_loss"), entry.get("full_set_loss")
        gain = ""
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (pl, fl)):
            gain = _num(fl - pl, "+.3g") + " " + _iv(entry.get("improvement_interval"), "+.3g")
        exact = entry.get("exact")
        p = entry.get("p_better_than_all")
        row = [e(entry["target"]), str(len(entry["tasks"])), _tasks_html(entry["tasks"]),
               (_num(pl) if pl is not None else "<em>withheld</em>") + " " + _iv(entry.get("predicted_interval"))]
        hidden = "<em>withheld</em>" if report.withheld else None  # no loss in loss units (the warning says why)
        if gradex:
            row.append(hidden or _num(entry.get("gradex_loss")) + (
                f" (all tasks {_num(entry.get('full_set_gradex_loss'))})" if "full_set_gradex_loss" in entry else ""))
        row += [_num(fl) if fl is not None else (hidden or "<em>out of range</em>"), gain,
                "" if p is None else f"{p:.0%}",
                "" if exact is None else ("exhaustive" if exact else "heuristic")]
        if "left_support" in entry:
            ls = entry["left_support"]
            row[2] += (f'<div class="warn">A {ls["size"]}-task subset {e(left_support_reason(ls))} looked '
                       'better; it is not recommended.</div>')
        rows.append(row)
    header = ["target", "size", "tasks", "predicted loss"] + (["GradEx loss"] if gradex else []) + \
        ["all-tasks loss", "improvement", "better than all tasks (bootstrap)", "search"]
    nums = {1, 3, 4, 5} | ({6} if gradex else set())
    return _table(header, rows, num_cols=nums)


def _subsets_section(report: "AttributionReport") -> str:
    out = ["<h2>Best task subsets</h2>"]
    if not report.best_subsets:
        return out[0] + "<p><em>None computed.</em></p>"
    sup = report.fit_quality.get("support")
    where = ""
    if isinstance(sup, dict) and sup.get("mode") not in (None, "none"):
        where = (f" Searched only where the surrogate has evidence: subsets of {sup.get('min_size')}\u2013"
                 f"{sup.get('max_size')} tasks" + (f" within Hamming distance {sup['radius']} of a fitted subset"
                                                  if "radius" in sup else "") + ".")
    out.append(
        '<p class="note">For each target, the subset of source tasks with the lowest predicted target loss.'
        f"{e(where)} With GradEx features the best candidates are re-scored by GradEx and the one it rates "
        "best is recommended. \u201cexhaustive\u201d: every candidate was scored; \u201cheuristic\u201d: a "
        "local search.</p>")
    out.append(_subset_table(report, report.best_subsets))
    return "".join(out)


def _groups_section(report: "AttributionReport") -> str:
    out = ["<h2>Recommended co-training groups</h2>"]
    if not report.groups:
        return out[0] + "<p><em>None computed.</em></p>"
    out.append('<p class="note">Chosen by the surrogate\'s predicted group losses: at most the given number of '
               "groups, each task served by the group (among those containing it) where its own target's "
               "loss is lowest, each other target by the best group.</p>")
    rows = []
    for g, entry in enumerate(report.groups, 1):
        pl = entry.get("predicted_loss")
        if isinstance(pl, dict):
            pl_html = "<br>".join(f"{e(k)}: {_num(v)}" for k, v in pl.items())
        else:
            pl_html = (_num(pl) if pl is not None else "<em>withheld</em>") + " " + _iv(entry.get("predicted_interval"))
        p = entry.get("p_better_than_all")
        rows.append([str(g), _tasks_html(entry["tasks"]), _tasks_html(entry.get("serves", [])), pl_html,
                     _num(entry.get("all_tasks_loss")) if entry.get("all_tasks_loss") is not None else "",
                     "" if p is None else f"{p:.0%}"])
    out.append(_table(["group", "tasks", "serves targets", "predicted loss", "all-tasks loss",
                       "better than all tasks (bootstrap)"], rows, num_cols={0, 4, 5}))
    return "".join(out)


def _data_section(report: "AttributionReport") -> str:
    if report.subsets is None and report.losses is None:
        return ""
    out = ["<h2>Surrogate training data</h2>"]
    if report.subsets is not None:
        sizes = report.subsets.sum(axis=1)
        out.append(
            f"<p>{len(report.subsets)} task subsets; tasks per subset: min {int(sizes.min()) if len(sizes) else 0}, "
            f"mean {_num(float(sizes.mean()) if len(sizes) else 0.0)}, max {int(sizes.max()) if len(sizes) else 0} "
            f"(of {report.n_tasks}). Stored in <code>subsets.npy</code>.</p>"
        )
    if report.losses is not None and len(report.losses):
        rows = []
        for t, target in enumerate(report.target_names[:50]):
            col = report.losses[:, t]
            rows.append([e(target), _num(float(np.nanmin(col))), _num(float(np.nanmean(col))), _num(float(np.nanmax(col)))])
        more = "" if report.n_targets <= 50 else f"<p class=note>({report.n_targets - 50} more targets in losses.npy)</p>"
        out.append("<p>Losses on those subsets (stored in <code>losses.npy</code>):</p>")
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


def _interaction_heatmap(report: "AttributionReport", d: int) -> str:
    K, T = report.n_tasks, report.n_targets
    dname = report.target_names[d]
    out = [f"<h2>Pairwise interactions (target {e(dname)})</h2>"]
    note = "" if T == 1 else (
        f" Shown for target <b>{e(dname)}</b>; the other {T - 1} target(s) are in <code>interactions.csv</code>."
    )
    out.append(
        '<p class="note">Blue (&lt; 0): each task\u2019s effect is larger with the other present \u2014 synergy '
        "for two helpful tasks, redundant harm for two harmful ones. Red (&gt; 0): each task\u2019s effect is "
        "smaller with the other present \u2014 redundancy for two helpful tasks, compounding harm for two "
        f"harmful ones. One helpful and one harmful task: masking. The tooltip names the case.{note}</p>"
    )
    full = report.interactions[d]
    shown = _interaction_tasks(full)
    if len(shown) < K:
        out.append(
            f'<p class="note">{K} tasks are too many for one readable matrix: showing the {len(shown)} '
            "tasks with the strongest interactions (largest |interaction| with any partner).</p>"
        )
    cell = float(max(8, min(28, 640 // max(len(shown), 1))))
    mat = full[np.ix_(shown, shown)]
    names = [report.task_names[k] for k in shown]
    from .text import interaction_label

    def tip(i, j, v):
        label = interaction_label(report, shown[i], shown[j], d)[0] if v != 0 and math.isfinite(v) else "none"
        return f"{names[i]} + {names[j]} ({dname}): interaction {v:.3g} ({label})"

    out.append(
        '<div class="scroll">'
        + heatmap_svg(
            mat, names, names, cell_class="ksm-icell", tooltip=tip,
            good_sign=-1.0, legend_left="larger together", legend_right="smaller together",
            title=f"Pairwise interactions for target {dname}", gid="ksm-grad-inter",
            cell_w=cell, cell_h=cell, show_values=False, skip_diagonal=True,
            row_ids=shown, col_ids=shown,
        )
        + "</div>"
    )
    return "".join(out)


def render_html(report: "AttributionReport") -> str:
    """The whole page as a string."""
    K, T = report.n_tasks, report.n_targets
    dm = report.default_method
    focus = [report.target_index(n) for n in report.focus_targets]
    order = focus + [t for t in range(T) if t not in focus]
    level = report.intervals.get("level")
    body = [
        "<h1>Task attribution report</h1>",
        *[f"<p class=bad><b>{e(w)}</b></p>" for w in report.warnings()],  # said first
        f"<p>{K} source tasks \u00d7 {T} targets \u00b7 method <b>{e(dm)}</b> \u00b7 created {e(report.created_at)}"
        + (f" \u00b7 intervals: {level:.0%} bootstrap over the fitted subsets" if level else "") + "</p>",
        "<h2>How to read this page</h2>",
        "<ul><li><b>Score</b> of a source task for a target: the predicted <i>increase</i> of the target "
        "loss when that task is removed from training. <span class=good>Score &gt; 0: the task helps</span>; "
        "<span class=bad>score &lt; 0: it hurts</span>. <span class=noise>Within noise</span>: its interval "
        "contains 0, so even the sign is not established.</li>"
        "<li><b>Interaction</b> of two tasks: g(all) \u2212 g(all without i) \u2212 g(all without j) + "
        "g(all without i and j), where g is the surrogate's predicted loss; its meaning depends on whether "
        "the tasks help or hurt (synergy / redundancy, compounding / redundant harm, masking).</li>"
        "<li>Colours: <span class=good>blue is good for the target</span>, <span class=bad>red is bad</span>, "
        "white is neutral; the score heatmap has one colour scale per target column. Hover a cell for its "
        "value.</li></ul>",
    ]
    for t in focus[:3] if not report.withheld else []:  # withheld: no helps / hurts, only the order below
        body.append(_focus_section(report, t))
    if len(focus) > 3:
        body.append(f'<p class="note">{len(focus) - 3} more targets of interest: see the rankings below.</p>')
    body.append(_groups_section(report))

    sc = report.scores[dm][:, order]
    names = [report.target_names[t] for t in order]
    body.append(f"<h2>Attribution scores ({e(dm)}), every target</h2>" if not report.withheld else "")
    body.append("" if report.withheld else
        '<div class="scroll">'
        + heatmap_svg(
            sc, list(report.task_names), names,
            cell_class="ksm-cell",
            tooltip=lambda i, j, v: f"{report.task_names[i]} \u2192 {names[j]}: {dm} score {v:.3g}",
            good_sign=1.0, legend_left="hurts", legend_right="helps",
            title=f"Attribution scores ({dm}): source task \u00d7 target", gid="ksm-grad-scores",
            cell_w=64.0, cell_h=22.0, show_values=K * T <= 2000, col_ids=order, column_scale=True,
        )
        + "</div>"
    )
    if report.interactions is not None:
        body.append(_interaction_heatmap(report, focus[0]))
    body.append(_ranked_section(report, order))
    body.append(_subsets_section(report))
    body.append(_fit_section(report))
    body.append(_data_section(report))

    body.append("<h2>Run details</h2>")
    if report.timings:
        rows = [[e(k), _num(v)] for k, v in report.timings.items()]
        body.append("<h3>Timings (seconds)</h3>" + _table(["stage", "seconds"], rows, num_cols={1}))
    if report.seeds:
        body.append("<h3>Seeds</h3>" + _kv_table(report.seeds))
    body.append("<h3>Versions</h3>")
    body.append(_table(["package", "version"], [[e(k), e(v)] for k, v in report.versions.items()]))
    body.append("<h3>Configuration</h3>" + (_kv_table(report.config) if report.config else "<p><em>(empty)</em></p>"))

    dname = report.target_names[focus[0]]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>lightning-ksm report: {e(dname)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
