"""``lightning-ksm analyze DIR``: re-run the analysis of a saved harvest with new settings."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import AnalysisConfig
from ..rundir import RunDirectory
from ._base import PROG, CLIError
from .options import analysis_options, option_for
from .outdir import ReportDir

__all__ = ["run_analyze", "saved_report_settings", "EXIT_INCOMPLETE"]

#: Exit status of ``analyze`` for a harvest that is incomplete or damaged (2: bad input, 1: I/O).
EXIT_INCOMPLETE = 3


def _find_harvest(directory: str) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CLIError(f"DIR {directory!r} does not exist")
    if not path.is_dir():
        raise CLIError(f"DIR {directory!r} is not a directory")
    found = RunDirectory.find(path, "harvest", "manifest.json")
    if found is not None:
        return Path(found)
    run_harvest = Path(RunDirectory(path).harvest)
    raise CLIError(
        f"no harvest in DIR {directory!r}: expected {str(path / 'manifest.json')!r} (a harvest "
        f"directory) or {str(run_harvest / 'manifest.json')!r} (a TaskAttribution output directory)"
    )


def _source_task_count(harvest_dir: Path) -> int:
    """Source tasks of a store, from its manifest alone (before any array is read)."""
    from ..store import FeatureStore

    try:
        manifest = FeatureStore(harvest_dir).manifest()
    except (ValueError, OSError) as exc:
        raise CLIError(f"cannot read the harvest in {str(harvest_dir)!r}: {exc}", status=EXIT_INCOMPLETE) from None
    splits = {name: v.get("shards", []) for name, v in manifest["splits"].items()}
    for split in ("source", "target"):
        if not splits.get(split):
            stored = sorted(s for s, shards in splits.items() if shards)
            raise CLIError(
                f"the harvest in {str(harvest_dir)!r} has no {split!r} split (stored splits: {stored}); "
                "it is incomplete: resume or re-run the harvest", status=EXIT_INCOMPLETE)
    return len({v for shard in splits["source"] for v in shard.get("task_values", [])})


# -- settings: defaults < --config < options -------------------------------------------------------


def saved_report_settings(payload: Any) -> dict | None:
    """The analysis settings recorded in a parsed ``report.json`` (its ``config["analysis"]``).

    None when ``payload`` is not a saved report; raises ValueError for a report without them. This is
    the documented part of the report format that ``--config report.json`` reuses.
    """
    from ..report import REPORT_FORMAT

    if not isinstance(payload, dict) or payload.get("format") != REPORT_FORMAT:
        return None
    config = payload.get("config")
    settings = config.get("analysis") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise ValueError("a report without analysis settings (config.analysis)")
    return settings


def _read_config_file(path: str) -> dict:
    """Analysis settings from a JSON file: {field: value}, {"analysis": {...}} or a report.json."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"--config {path!r} cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"--config {path!r} is not valid JSON: {exc}") from None
    try:
        from_report = saved_report_settings(data)
    except ValueError as exc:
        raise CLIError(f"--config {path!r} is {exc}") from None
    if from_report is not None:
        data = from_report
    elif isinstance(data, dict) and set(data) == {"analysis"} and isinstance(data["analysis"], dict):
        data = data["analysis"]
    if not isinstance(data, dict):
        raise CLIError(f"--config {path!r} must hold a JSON object of analysis settings")
    known = sorted(option.name for option in analysis_options())
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CLIError(f"--config {path!r} has unknown setting(s) {unknown}; known settings: {known}")
    out = {}
    for name, value in data.items():
        try:
            out[name] = option_for(name).parse(value)
        except ValueError as exc:
            raise CLIError(f"--config {path!r}: setting {name!r}: {exc}") from None
    return out


def _resolve_settings(args: argparse.Namespace, n_tasks: int) -> AnalysisConfig:
    """AnalysisConfig from defaults < --config < options, validated; errors name the option."""
    settings: dict = {}
    origin: dict = {}
    if args.config is not None:
        settings = _read_config_file(args.config)
        origin = {name: f"--config {args.config!r}:" for name in settings}
    given = {o.name: getattr(args, o.name) for o in analysis_options() if hasattr(args, o.name)}
    if "subset_p" in given:
        given.setdefault("subset_size", None)  # an explicit --subset-p overrides a size from --config
    settings.update(given)
    origin.update({name: f"argument {option_for(name).flag}:" for name in given})
    config = AnalysisConfig(**settings)
    try:
        config.validate(n_tasks)
    except ValueError as exc:
        message = str(exc)
        # The checks of config start their messages with the setting's name: point at its option.
        for option in sorted(analysis_options(), key=lambda o: len(o.name), reverse=True):
            if message.startswith(option.name + " "):
                where = origin.get(option.name, f"argument {option.flag}:")
                raise CLIError(f"{where} {message}") from None
        raise CLIError(f"{message} (harvest in {args.dir!r})") from None
    return config


def _resolve_out(args: argparse.Namespace, harvest_dir: Path) -> ReportDir:
    """The report directory, taken before the analysis starts (:mod:`.outdir`)."""
    if args.out is None:
        return ReportDir.new(harvest_dir.parent)
    out = Path(args.out)
    resolved, harvest = out.resolve(), harvest_dir.resolve()
    if resolved == harvest or harvest in resolved.parents:
        raise CLIError(f"argument --out: {args.out!r} is inside the harvest {str(harvest_dir)!r}; choose another directory")
    return ReportDir.take(out, force=bool(args.force))


def _carried_config(harvest_dir: Path) -> dict:
    """How the harvest was made, from the callback's report next to it (if any): kept for provenance."""
    from ..report import AttributionReport

    try:
        config = AttributionReport.load(RunDirectory(harvest_dir.parent).report).config
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: nothing to carry over
        return {}
    if not isinstance(config, dict):
        return {}
    # "analysis" is the new run's; "harvest" is re-read from the store's manifest.
    return {k: v for k, v in config.items() if k not in ("analysis", "harvest", "cli")}


def _check_harvest(harvest_dir: Path, allow_partial: bool) -> dict:
    from ..store import FeatureStore, StoreError

    try:
        return FeatureStore(harvest_dir).check_complete(allow_partial=allow_partial)
    except StoreError as exc:
        raise CLIError(f"{exc}", status=EXIT_INCOMPLETE) from None


def run_analyze(args: argparse.Namespace) -> int:
    harvest_dir = _find_harvest(args.dir)
    allow_partial = bool(getattr(args, "allow_partial", False))
    _check_harvest(harvest_dir, allow_partial)  # first: a killed harvest is named as such (exit 3)
    n_tasks = _source_task_count(harvest_dir)
    config = _resolve_settings(args, n_tasks)
    out = _resolve_out(args, harvest_dir)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    from ..analysis import analyze_store

    extra = _carried_config(harvest_dir)
    extra["cli"] = {"command": "analyze", "harvest_dir": str(harvest_dir.resolve()),
                    "config_file": None if args.config is None else str(Path(args.config).resolve())}
    start = time.perf_counter()
    from ..store import StoreError

    try:
        try:
            with warnings.catch_warnings():  # a damaged shard left out: said in the PARTIAL HARVEST warning below
                warnings.filterwarnings("ignore", message="allow_partial: ")
                report = analyze_store(harvest_dir, config, progress=progress, extra_config=extra,
                                       allow_partial=allow_partial)
        except StoreError as exc:
            raise CLIError(f"the harvest in {str(harvest_dir)!r} cannot be analysed: {exc}",
                           status=EXIT_INCOMPLETE) from None
        except (ValueError, TypeError, FileNotFoundError) as exc:
            # Settings were checked above, so this is the stored data (e.g. a corrupt or empty split).
            raise CLIError(f"the analysis of {str(harvest_dir)!r} failed: {exc}") from None
    except BaseException:
        out.release()  # no empty report directory or stale claim is left behind
        raise
    seconds = time.perf_counter() - start
    try:
        out.publish(report)
    except OSError as exc:
        out.release()
        raise CLIError(f"cannot write the report to {str(out.path)!r}: {exc}", status=1) from None
    if report.fit_quality.get("partial_harvest"):
        print(f"WARNING: PARTIAL HARVEST (--allow-partial): {report.fit_quality['notes'][0]}", file=sys.stderr)
    print(f"report written to {out.path.resolve()} ({seconds:.1f} s)")
    print(_summary(report, config))
    print(f"full tables: {PROG} show {shlex.quote(str(out.path))}")
    return 0


# -- the summary printed after a run ---------------------------------------------------------------


def _num(value: Any, spec: str) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(float(value), spec) if ok else "n/a"


def _summary(report, config: AnalysisConfig) -> str:
    """A few lines: size of the run, fit quality, top tasks and best subset of the default target."""
    from ..report import _terminal_safe as _safe  # task names are user data: no escape sequences

    fq = report.fit_quality
    lines = [
        *(["  PARTIAL HARVEST: only part of the data was analysed (see fit_quality notes)"]
          if fq.get("partial_harvest") else []),
        *[f"  WARNING: {_safe(w)}" for w in fq.get("warnings") or []],
        f"  {report.n_tasks} source tasks, {report.n_targets} targets, {config.n_subsets} subsets "
        f"(seed {config.seed}), kernel {config.kernel}",
        f"  surrogate held-out LDS {_num(fq.get('heldout_lds'), '.3f')} "
        f"(linear surrogate {_num(fq.get('linear_heldout_lds'), '.3f')})",
    ]
    target = report.default_target
    helps = ", ".join(f"{_safe(t)} ({v:+.3g})" for t, v in report.top_helpers(3, target)) or "none"
    hurts = ", ".join(f"{_safe(t)} ({v:+.3g})" for t, v in report.top_hurters(3, target)) or "none"
    lines.append(f"  target {_safe(target)!r}: helps most: {helps}; hurts most: {hurts}")
    for entry in report.best_subsets:
        if entry["target"] == target:
            lines.append(
                f"  best subset for {_safe(target)!r}: {{{', '.join(_safe(t) for t in entry['tasks'])}}} "
                f"(predicted loss {_num(entry.get('predicted_loss'), '.4g')})"
            )
    return "\n".join(lines)
