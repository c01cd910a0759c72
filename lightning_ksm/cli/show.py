"""``lightning-ksm show DIR``: print a saved report as ranked tables, or as a JSON summary."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from ..rundir import RunDirectory
from ._base import CLIError

__all__ = ["run_show", "parse_rows"]


def parse_rows(value: str) -> int | None:
    """--rows: a count >= 1, or 'all' (also 'auto' / 'none') for every task."""
    text = value.strip().lower()
    if text in ("all", "auto", "none", "null"):
        return None
    try:
        rows = int(text)
    except ValueError:
        rows = None
    if rows is None or rows < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'all', got {value!r}")
    return rows


def _find_report(directory: str) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CLIError(f"DIR {directory!r} does not exist")
    if path.is_file() and path.name == "report.json":
        return path.parent
    if not path.is_dir():
        raise CLIError(f"DIR {directory!r} is not a directory")
    found = RunDirectory.find(path, "report", "report.json")
    if found is not None:
        return Path(found)
    run_report = Path(RunDirectory(path).report)
    others = sorted(str(p.parent.relative_to(path)) for pattern in ("report*/report.json", "ksm/report*/report.json")
                    for p in path.glob(pattern))
    if others:
        raise CLIError(f"no report in DIR {directory!r} itself; reports found under it: {others} (pass one of them)")
    raise CLIError(
        f"no report in DIR {directory!r}: expected {str(path / 'report.json')!r} (a report directory) "
        f"or {str(run_report / 'report.json')!r} (a TaskAttribution output directory)"
    )


def _listing(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_summary(report, report_dir: Path, method: str, targets: list, rows: int | None) -> dict:
    """A JSON-able summary (non-finite numbers become null)."""
    rankings = {}
    pairs = {}
    for target in targets:
        t = report.target_index(target)
        ranked = report.ranked(t, method)[: rows if rows is not None else None]
        rankings[target] = [
            {"rank": r, "task": task, "score": _finite(score),
             "scores": {m: _finite(report.scores[m][report.task_index(task), t]) for m in report.methods}}
            for r, (task, score) in enumerate(ranked, 1)
        ]
        if report.interactions is not None:
            pairs[target] = {
                kind: [{"tasks": [a, b], "interaction": _finite(v)} for a, b, v in report.top_pairs(5, t, kind)]
                for kind in ("synergy", "antagonism")
            }
    return {
        "report_dir": str(report_dir.resolve()),
        "sign_convention": {
            "score": "predicted increase of the target loss when the task is removed; > 0: the task helps",
            "interaction": "< 0: synergy (the pair helps more together); > 0: antagonism",
        },
        "task_names": list(report.task_names),
        "target_names": list(report.target_names),
        "method": method,
        "methods": list(report.methods),
        "rankings": rankings,
        "top_pairs": pairs,
        "best_subsets": [e for e in report.best_subsets if e["target"] in targets],
        "groups": report.groups,
        "fit_quality": report.fit_quality,
        "config": report.config,
        "created_at": report.created_at,
    }


def _plain_json(obj: Any) -> Any:
    """Replace non-finite floats (anywhere) by None so that the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    return obj


def run_show(args: argparse.Namespace) -> int:
    from ..report import AttributionReport

    report_dir = _find_report(args.dir)
    try:
        report = AttributionReport.load(report_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(f"cannot read the report in {str(report_dir)!r}: {exc}") from None
    method = report.default_method if args.method is None else args.method
    if method not in report.scores:
        raise CLIError(f"argument --method: unknown method {method!r}; this report has {_listing(list(report.methods))}")
    if args.target is not None and args.target not in report.target_names:
        raise CLIError(
            f"argument --target: unknown target {args.target!r}; this report has {_listing(list(report.target_names))}"
        )
    if args.json:
        targets = [args.target] if args.target is not None else (
            [report.default_target] + [t for t in report.target_names if t != report.default_target]
        )
        rows = getattr(args, "rows", None)
        payload = _json_summary(report, report_dir, method, targets, rows)
        print(json.dumps(_plain_json(payload), indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    rows = getattr(args, "rows", 10)
    text = report.to_text(rows, method=method, targets=None if args.target is None else [args.target])
    sys.stdout.write(text)
    return 0
