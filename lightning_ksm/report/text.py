"""Plain-text rendering of an :class:`~lightning_ksm.report.AttributionReport` for a terminal.

Also the number formatting shared with the HTML page (:func:`format_number`) and the guard that
keeps escape sequences in user-given names out of the terminal (:func:`terminal_safe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["WITHHELD_LINE", "render_text", "format_number", "terminal_safe", "interaction_label", "strongest_pairs"]


WITHHELD_LINE = ("MAGNITUDES WITHHELD (the warning above says why): 'order' ranks the tasks, K for the most "
                 "helpful down to 1; it is an order, not a loss, and no loss is shown")


def terminal_safe(text: str) -> str:
    """``text`` with non-printable characters (escape sequences, newlines) written as escapes."""
    # Task names come from user data: keep escape sequences and newlines out of the terminal.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_number(v: Any, spec: str = ".4g") -> str:
    """``v`` for display: floats with ``spec``, ints exactly, anything else as ``str``."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), spec)
    return str(v)


def _iv(lo, hi, spec: str = "+.3g") -> str:
    return f"[{format_number(lo, spec)}, {format_number(hi, spec)}]"


def interaction_label(report: "AttributionReport", i: int, j: int, t: int) -> tuple:
    """``(label, sentence)`` of the interaction of tasks i and j for target t, by the tasks' case
    (both help, both hurt, mixed), from the leave-one-out scores (the same base as the interaction)."""
    from ..readouts.scores import interaction_case

    sc = report.scores.get("loo", report.scores[report.default_method])
    return interaction_case(float(sc[i, t]), float(sc[j, t]), float(report.interactions[t, i, j]))


def strongest_pairs(report: "AttributionReport", t: int, n: int = 6) -> list:
    """The ``n`` pairs with the largest |interaction| for target t: ``(i, j, value, lo, hi, label,
    sentence, within_noise)``; lo/hi/within_noise are None without intervals."""
    if report.interactions is None:
        return []
    mat = report.interactions[t]
    iu, ju = np.triu_indices(report.n_tasks, k=1)
    vals = mat[iu, ju]
    order = np.argsort(-np.abs(np.where(np.isfinite(vals), vals, 0.0)), kind="stable")
    iv = report.interaction_interval(t)
    out = []
    for p in order[:n]:
        i, j, v = int(iu[p]), int(ju[p]), float(vals[p])
        if v == 0 or not np.isfinite(v):
            continue
        label, sentence = interaction_label(report, i, j, t)
        lo = hi = noise = None
        if iv is not None:
            lo, hi = float(iv[0, i, j]), float(iv[1, i, j])
            noise = lo <= 0 <= hi
        out.append((i, j, v, lo, hi, label, sentence, noise))
    return out


def render_text(
    report: "AttributionReport",
    max_rows: int | None = 10,
    *,
    method: str | None = None,
    targets: Sequence | None = None,
) -> str:
    """The plain-text summary; see :meth:`AttributionReport.to_text`."""
    method = report._method(method)
    if max_rows is not None and (isinstance(max_rows, bool) or int(max_rows) < 1):
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    if targets is None:
        first = [report.target_index(n) for n in report.focus_targets]
        cols = first + [t for t in range(report.n_targets) if t not in first]
    else:
        cols = [report.target_index(t) for t in targets]
    s = terminal_safe
    methods = [method] + [m for m in report.methods if m != method]
    iv = report.score_interval(method)
    level = report.intervals.get("level")
    lines = [
        f"lightning-ksm task attribution: {report.n_tasks} source tasks, {report.n_targets} targets, "
        f"ranked by '{method}'",
        "score = predicted increase of the target loss when the task is removed (> 0: the task helps)"
        if not report.withheld else WITHHELD_LINE,
    ]
    for warning in reversed(report.warnings()):  # said first
        lines.insert(0, "WARNING: " + s(warning))
    if iv is not None:
        lines.append(f"[lo, hi] = {level:.0%} bootstrap interval over the fitted subsets; "
                     "'~' = within noise (the interval contains 0)")
    fq = _fit_line(report)
    if fq:
        lines.append(fq)
    for t in cols:
        target = report.target_names[t]
        lines += ["", f"== target '{s(target)}' =="]
        rows = report.ranked(t, method)
        shown = list(enumerate(rows, 1))
        hidden = 0
        if max_rows is not None and len(rows) > max_rows:
            head = (int(max_rows) + 1) // 2
            tail = int(max_rows) - head
            hidden = len(rows) - head - tail
            shown = shown[:head] + ([] if tail == 0 else shown[-tail:])
        name_w = max([4] + [len(s(task)) for _, (task, _v) in shown])
        col_w = max(10, *(len(m) + 2 for m in methods))
        header = f"  {'rank':>4}  {'task':<{name_w}}" + "".join(
            f"{(m + '*') if m == method else m:>{col_w}}" for m in methods
        ) + ("   interval" if iv is not None else "")
        lines.append(header)
        for pos, (rank, (task, _v)) in enumerate(shown):
            if hidden and pos == (int(max_rows) + 1) // 2:
                lines.append(f"  {'...':>4}  ({hidden} more {'task' if hidden == 1 else 'tasks'} not shown; max_rows={max_rows})")
            k = report.task_index(task)
            vals = "".join(f"{format_number(report.scores[m][k, t], '+.3g'):>{col_w}}" for m in methods)
            extra = ""
            if iv is not None:
                lo, hi = iv[:, k, t]
                extra = f"   {_iv(lo, hi)}" + (" ~" if lo <= 0 <= hi else "")
            lines.append(f"  {rank:>4}  {s(task):<{name_w}}{vals}{extra}")
        pairs = strongest_pairs(report, t, 6)
        by_label: dict = {}
        for i, j, v, lo, hi, label, sentence, noise in pairs:
            ivs = "" if lo is None else " " + _iv(lo, hi) + (" ~" if noise else "")
            by_label.setdefault((label, sentence), []).append(
                f"{s(report.task_names[i])} + {s(report.task_names[j])} ({v:+.3g}{ivs})")
        for (label, sentence), items in by_label.items():
            lines.append(f"  strongest {label}: {', '.join(items[:3])}  ({sentence})")
    if report.best_subsets:
        lines += ["", "== best subsets (lowest predicted target loss) ==",
                  "  (searched only where the surrogate has evidence; see the fit quality's support)"]
        for e in report.best_subsets:
            lines += _subset_lines(e, s)
    if report.groups:
        lines += ["", "== recommended co-training groups ==",
                  "  (chosen by predicted group losses; each target is served by its best group)"]
        for g, e in enumerate(report.groups, 1):
            pl = e.get("predicted_loss")
            if pl is None:
                pl_txt = "withheld"
            elif isinstance(pl, dict):
                pl_txt = ", ".join(f"{s(k)}: {format_number(v, '.3g')}" for k, v in pl.items())
            else:
                pl_txt = format_number(pl, ".3g")
            if "predicted_interval" in e:
                pl_txt += " " + _iv(*e["predicted_interval"], spec=".3g")
            serves = e.get("serves")
            tail = f"; serves {', '.join(s(x) for x in serves)}" if serves else ""
            if isinstance(e.get("all_tasks_loss"), (int, float)):
                tail += f"; all tasks {format_number(e['all_tasks_loss'], '.3g')}"
            lines.append(f"  {g}. {{{', '.join(s(x) for x in e['tasks'])}}}  predicted loss {pl_txt}{tail}")
    return "\n".join(lines) + "\n"


def left_support_reason(ls: dict) -> str:
    """Why the better-looking subset of a best-subset entry's ``left_support`` is not recommended:
    outside the surrogate's evidence, at a loss the loss cannot take, or both."""
    reasons = []
    if ls.get("outside_evidence", ls.get("distance", 0) > 0):
        reasons.append(f"outside the surrogate's evidence (distance {ls['distance']} from the fitted subsets)")
    if ls.get("predicted_loss") is None:
        reasons.append("at a loss below the lowest possible")
    return " and ".join(reasons) or "that the search inside the evidence did not reach"


def _subset_lines(e: dict, s) -> list:
    how = "" if "exact" not in e else (", exhaustive search" if e["exact"] else ", heuristic search")
    pl = format_number(e.get("predicted_loss"), ".3g") if e.get("predicted_loss") is not None else "withheld"
    if "predicted_interval" in e:
        pl += " " + _iv(*e["predicted_interval"], spec=".3g")
    extra = ""
    if e.get("full_set_loss") is not None:
        extra = f" vs all tasks {format_number(e['full_set_loss'], '.3g')}"
    if "p_better_than_all" in e:
        extra += f" (better than all tasks in {e['p_better_than_all']:.0%} of bootstrap fits)"
    n = len(e["tasks"])
    out = [f"  target '{s(str(e['target']))}', {n} {'task' if n == 1 else 'tasks'}: predicted loss {pl}{extra}{how}",
           f"    {{{', '.join(s(x) for x in e['tasks'])}}}"]
    if "gradex_loss" in e:
        out.append(f"    GradEx: {format_number(e['gradex_loss'], '.3g')} (all tasks "
                   f"{format_number(e.get('full_set_gradex_loss'), '.3g')})")
    if "left_support" in e:
        ls = e["left_support"]
        out.append(f"    note: a {ls['size']}-task subset {left_support_reason(ls)} looked better to the "
                   "surrogate; not recommended")
    return out


def _fit_line(report: "AttributionReport") -> str:
    """The one-line summary of the surrogate's fit quality, or "" when none was recorded."""
    fq = report.fit_quality
    parts = []
    known = (("heldout_lds", "held-out LDS", ".3f"), ("heldout_residual_error", "held-out residual error", ".3g"))
    for key, label, spec in known:
        if isinstance(fq.get(key), (int, float)) and not isinstance(fq.get(key), bool):
            parts.append(f"{label} {fq[key]:{spec}}")
    line = "surrogate fit: " + ", ".join(parts) if parts else ""
    if "n_train_subsets" in fq or "n_heldout_subsets" in fq:
        line = (line or "surrogate fit:") + (
            f" ({fq.get('n_train_subsets', '?')} train / {fq.get('n_heldout_subsets', '?')} held-out subsets)"
        )
    return line
