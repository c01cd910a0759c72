"""Plain-text rendering of an :class:`~lightning_ksm.report.AttributionReport` for a terminal.

Also the number formatting shared with the HTML page (:func:`format_number`) and the guard that
keeps escape sequences in user-given names out of the terminal (:func:`terminal_safe`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["render_text", "format_number", "terminal_safe"]


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
        d = report.target_index(None)
        cols = [d] + [t for t in range(report.n_targets) if t != d]
    else:
        cols = [report.target_index(t) for t in targets]
    s = terminal_safe
    methods = [method] + [m for m in report.methods if m != method]
    lines = [
        f"lightning-ksm task attribution: {report.n_tasks} source tasks, {report.n_targets} targets, "
        f"ranked by '{method}'",
        "score = predicted increase of the target loss when the task is removed (> 0: the task helps)",
    ]
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
        col_w = max(11, *(len(m) + 2 for m in methods))
        header = f"  {'rank':>4}  {'task':<{name_w}}" + "".join(
            f"{(m + '*') if m == method else m:>{col_w}}" for m in methods
        )
        lines.append(header)
        for pos, (rank, (task, _v)) in enumerate(shown):
            if hidden and pos == (int(max_rows) + 1) // 2:
                lines.append(f"  {'...':>4}  ({hidden} more {'task' if hidden == 1 else 'tasks'} not shown; max_rows={max_rows})")
            k = report.task_index(task)
            vals = "".join(f"{format_number(report.scores[m][k, t], '+.4g'):>{col_w}}" for m in methods)
            lines.append(f"  {rank:>4}  {s(task):<{name_w}}{vals}")
        if report.interactions is not None:
            for kind in ("synergy", "antagonism"):
                pairs = report.top_pairs(3, t, kind)
                if pairs:
                    txt = ", ".join(f"{s(a)} + {s(b)} ({v:+.3g})" for a, b, v in pairs)
                    lines.append(f"  strongest {kind}: {txt}")
    if report.best_subsets:
        lines += ["", "== best subsets (lowest predicted target loss) =="]
        for e in report.best_subsets:
            how = "" if "exact" not in e else (", exhaustive search" if e["exact"] else ", heuristic search")
            extra = ""
            if "full_set_loss" in e:
                extra = f" vs all tasks {format_number(e['full_set_loss'])}"
            lines.append(
                f"  target '{s(str(e['target']))}', {len(e['tasks'])} {'task' if len(e['tasks']) == 1 else 'tasks'}: predicted loss "
                f"{format_number(e.get('predicted_loss'))}{extra}{how}"
            )
            lines.append(f"    {{{', '.join(s(x) for x in e['tasks'])}}}")
    if report.groups:
        lines += ["", "== recommended co-training groups =="]
        for g, e in enumerate(report.groups, 1):
            pl = e.get("predicted_loss")
            if isinstance(pl, dict):
                pl_txt = ", ".join(f"{s(k)}: {format_number(v)}" for k, v in pl.items())
            else:
                pl_txt = format_number(pl)
            lines.append(f"  {g}. {{{', '.join(s(x) for x in e['tasks'])}}}  predicted loss {pl_txt}")
    return "\n".join(lines) + "\n"


def _fit_line(report: "AttributionReport") -> str:
    """The one-line summary of the surrogate's fit quality, or "" when none was recorded."""
    fq = report.fit_quality
    parts = []
    known = (("heldout_lds", "held-out LDS", ".3f"), ("heldout_residual_error", "held-out residual error", ".4g"))
    for key, label, spec in known:
        if isinstance(fq.get(key), (int, float)) and not isinstance(fq.get(key), bool):
            parts.append(f"{label} {fq[key]:{spec}}")
    line = "surrogate fit: " + ", ".join(parts) if parts else ""
    if "n_train_subsets" in fq or "n_heldout_subsets" in fq:
        line = (line or "surrogate fit:") + (
            f" ({fq.get('n_train_subsets', '?')} train / {fq.get('n_heldout_subsets', '?')} held-out subsets)"
        )
    return line
