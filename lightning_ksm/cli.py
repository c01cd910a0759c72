"""The ``lightning-ksm`` command line: re-analyse a saved harvest, print a saved report.

``lightning-ksm analyze DIR`` re-runs GradEx, the kernel surrogate and the readouts on the features
that a :class:`~lightning_ksm.TaskAttribution` run (or :func:`lightning_ksm.harvest.harvest` with a
store) saved, with new analysis settings; the model is not needed. ``lightning-ksm show DIR`` prints
a saved :class:`~lightning_ksm.AttributionReport` as ranked tables, or as JSON.

Exit codes: 0 success; 2 bad input (unknown option, invalid setting, a directory without a harvest or
report, unknown target or method), with a one-line message and no traceback; 1 a failure while
writing the report; 130 interrupted.

This module never imports Lightning: it only needs the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "CLIError"]

PROG = "lightning-ksm"

_SIGNS = """\
sign convention (F is a loss, lower is better):
  score       = predicted increase of the target loss when the task is removed:
                score > 0: the task helps the target; score < 0: it hurts.
  interaction = g(all) - g(all - i) - g(all - j) + g(all - i - j):
                < 0: synergy (the pair helps more together); > 0: antagonism / redundancy."""

_DESCRIPTION = """\
lightning-ksm: task attribution with kernel surrogate models (Zhang, Duan, Zhang, ICLR 2026).

From one training run, the TaskAttribution callback saves per-sample outputs and projected
gradients at the early weights W0 (the "harvest") and an attribution report: which source tasks
help or hurt each target, which pairs interact, the best task subset per target and recommended
co-training groups. This command re-analyses a saved harvest with new settings (no model and no
retraining needed: GradEx solves the linearized fine-tuning problem for many random task subsets,
then a kernel surrogate is fitted to those losses) and prints saved reports.

""" + _SIGNS

_MAIN_EPILOG = """\
examples:
  lightning-ksm show lightning_logs/version_0/ksm
  lightning-ksm analyze lightning_logs/version_0/ksm --n-subsets 400 --seed 1
  lightning-ksm show lightning_logs/version_0/ksm/report-20260101-120000 --target all --rows 20
  lightning-ksm <command> --help      (options of one command)
"""

_ANALYZE_DESCRIPTION = """\
Re-run the analysis of a saved harvest with new settings and save a new report.

DIR is a harvest directory (a feature store with a manifest.json) or the output directory of the
TaskAttribution callback, which holds harvest/, report/ and w0.pt. The model is not needed: GradEx
re-solves the linearized fine-tuning problem for the sampled task subsets from the stored features,
a kernel surrogate is fitted to the resulting losses, and the readouts are recomputed.

Settings are taken, in increasing priority, from the defaults of AnalysisConfig, from --config
(a JSON object of AnalysisConfig fields, or a saved report.json, whose settings are reused), and
from the options below. The report goes to a new directory next to the harvest
(report-<date>-<time>) unless --out is given; an existing non-empty --out is only overwritten with
--force.

""" + _SIGNS

_ANALYZE_EPILOG = """\
examples:
  lightning-ksm analyze runs/ksm                          # defaults, new report next to harvest/
  lightning-ksm analyze runs/ksm --n-subsets 400 --seed 1 --out runs/ksm/report-m400
  lightning-ksm analyze runs/ksm --config runs/ksm/report/report.json --lam 1e-2
                                                          # the callback's settings, new lam
  lightning-ksm analyze runs/ksm/harvest --subset-size 5 --best-subset-size 3 --kernel poly
"""

_SHOW_DESCRIPTION = """\
Print a saved attribution report: for every target, the source tasks ranked from most helpful to
most harmful (all score methods side by side, the ranking method marked with *), the strongest
synergistic and antagonistic pairs, the best task subsets and the recommended co-training groups.

DIR is a report directory (holding report.json) or the output directory of the TaskAttribution
callback, which holds report/.

""" + _SIGNS

_SHOW_EPILOG = """\
examples:
  lightning-ksm show runs/ksm
  lightning-ksm show runs/ksm/report --target all --method loo --rows all
  lightning-ksm show runs/ksm --json > attribution.json
"""


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2 (no traceback)."""

    def __init__(self, message: str, *, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions; give option help a bit more room."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


# -- value parsers ---------------------------------------------------------------------------------
# Each takes a command-line string or an already typed value (from a --config JSON file) and returns
# the value for AnalysisConfig, or raises argparse.ArgumentTypeError with a message that completes
# "argument --flag: ...".


def _auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "none", "null"))


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    else:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if not math.isfinite(out):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return out


def _int_at_least(low: int, *, optional: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if optional and _auto(value):
            return None
        out = _to_int(value)
        if out < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {out}")
        return out

    return parse


def _positive_float(*, optional: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if optional and _auto(value):
            return None
        out = _to_float(value)
        if out <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
        return out

    return parse


def _fraction(value: Any) -> float:
    out = _to_float(value)
    if not 0 < out < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {value!r}")
    return out


def _seed(value: Any) -> int:
    out = _to_int(value)
    if out < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {out}")
    return out


def _choice(options: Sequence[str], *, optional: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if optional and _auto(value):
            return None
        if not isinstance(value, str) or value.strip().lower() not in options:
            allowed = ", ".join(options) + (", auto" if optional else "")
            raise argparse.ArgumentTypeError(f"must be one of {allowed}; got {value!r}")
        return value.strip().lower()

    return parse


@dataclass(frozen=True)
class _Setting:
    """One analysis option: the AnalysisConfig field it sets, how to parse it, its help."""

    field: str
    parse: Callable[[Any], Any]
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


_KERNELS = ("rbf", "poly", "linear")
_LOSSES = ("cross_entropy", "logistic", "squared")
_WEIGHTINGS = ("task", "sample")

# One entry per AnalysisConfig field (tests check that none is missing). subset_p and subset_size
# are listed here too; build_parser puts them in a mutually exclusive group.
_SETTINGS = (
    _Setting("n_subsets", _int_at_least(1), "N",
             "random task subsets solved by GradEx, the surrogate's training set; at least 10"),
    _Setting("subset_p", _fraction, "P",
             "include each task in a subset with probability P (clears a subset_size from --config)"),
    _Setting("subset_size", _int_at_least(1, optional=True), "S",
             "exactly S tasks per subset, instead of --subset-p"),
    _Setting("seed", _seed, "SEED", "seed of subset sampling, the held-out split and the readouts"),
    _Setting("lam", _positive_float(), "L", "ridge strength of the linearized fine-tuning problem"),
    _Setting("loss", _choice(_LOSSES, optional=True), "{" + ",".join(_LOSSES) + ",auto}",
             "GradEx loss; auto: chosen from the harvest's output mode"),
    _Setting("weighting", _choice(_WEIGHTINGS), "{" + ",".join(_WEIGHTINGS) + "}",
             "task: every selected task weighs the same (paper eq. 1); sample: every sample does"),
    _Setting("kernel", _choice(_KERNELS), "{" + ",".join(_KERNELS) + "}", "surrogate kernel"),
    _Setting("gamma", _positive_float(optional=True), "G",
             "kernel width (rbf) or scale (poly); auto: selected by leave-one-out"),
    _Setting("alpha", _positive_float(optional=True), "A",
             "kernel ridge regularization; auto: selected by leave-one-out"),
    _Setting("holdout", _fraction, "F",
             "fraction of subsets held out to measure the surrogate's fit (held-out LDS)"),
    _Setting("ensemble_samples", _int_at_least(1), "N", "subsets sampled for the ensemble scores"),
    _Setting("n_groups", _int_at_least(1, optional=True), "G",
             "number of co-training groups; auto: about sqrt(K/2), at least 2"),
    _Setting("best_subset_size", _int_at_least(1, optional=True), "S",
             "size of the recommended subset per target; auto: any size"),
    _Setting("max_exact", _int_at_least(1), "N",
             "search the best subset exhaustively up to N candidates, else by local search"),
)
_BY_FIELD = {s.field: s for s in _SETTINGS}


def _default_text(field: str, value: Any) -> str:
    if value is None:
        return "off" if field == "subset_size" else "auto"
    return str(value)


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-ksm`` argument parser (subcommands ``analyze`` and ``show``)."""
    from . import __version__
    from .analysis import AnalysisConfig

    defaults = AnalysisConfig()
    parser = argparse.ArgumentParser(
        prog=PROG, description=_DESCRIPTION, epilog=_MAIN_EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    analyze = sub.add_parser(
        "analyze", help="re-run the analysis of a saved harvest with new settings",
        usage=f"{PROG} analyze DIR [--out OUT] [--force] [--config FILE] [--[no-]progress] [SETTINGS...]",
        description=_ANALYZE_DESCRIPTION, epilog=_ANALYZE_EPILOG, formatter_class=_Formatter,
    )
    analyze.add_argument("dir", metavar="DIR", help="harvest directory, or the callback's output directory")
    analyze.add_argument("--out", metavar="OUT",
                         help="report directory (default: a new report-<date>-<time> next to the harvest)")
    analyze.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    analyze.add_argument("--config", metavar="FILE",
                         help="JSON file of analysis settings, or a saved report.json to reuse its settings")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="show progress bars (default: when stderr is a terminal)")
    group = analyze.add_argument_group(
        "analysis settings", "Each option sets the AnalysisConfig field of the same name; "
        "'auto' resets an optional setting."
    )
    exclusive = group.add_mutually_exclusive_group()
    for setting in _SETTINGS:
        target = exclusive if setting.field in ("subset_p", "subset_size") else group
        target.add_argument(
            setting.flag, dest=setting.field, type=setting.parse, metavar=setting.metavar,
            default=argparse.SUPPRESS,  # absent unless given: --config values are not overridden
            help=f"{setting.help} (default: {_default_text(setting.field, getattr(defaults, setting.field))})",
        )

    show = sub.add_parser(
        "show", help="print a saved report: ranked tasks, interactions, subsets, groups",
        description=_SHOW_DESCRIPTION, epilog=_SHOW_EPILOG, formatter_class=_Formatter,
    )
    show.add_argument("dir", metavar="DIR", help="report directory, or the callback's output directory")
    show.add_argument("--target", metavar="NAME", help="show only this target (default: every target)")
    show.add_argument("--method", metavar="METHOD",
                      help="score method to rank by, e.g. ensemble, loo, linear (default: the report's)")
    show.add_argument("--rows", metavar="N", type=_int_at_least(1, optional=True), default=argparse.SUPPRESS,
                      help="tasks shown per target, or 'all' (default: 10; with --json: all)")
    show.add_argument("--json", action="store_true", help="print a machine-readable JSON summary instead")
    analyze.set_defaults(handler=_cmd_analyze, parser=analyze)
    show.set_defaults(handler=_cmd_show, parser=show)
    return parser


# -- analyze -------------------------------------------------------------------------------------


def _find_harvest(directory: str) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CLIError(f"DIR {directory!r} does not exist")
    if not path.is_dir():
        raise CLIError(f"DIR {directory!r} is not a directory")
    if (path / "manifest.json").is_file():
        return path
    if (path / "harvest" / "manifest.json").is_file():
        return path / "harvest"
    raise CLIError(
        f"no harvest in DIR {directory!r}: expected {str(path / 'manifest.json')!r} (a harvest "
        f"directory) or {str(path / 'harvest' / 'manifest.json')!r} (a TaskAttribution output directory)"
    )


def _source_task_count(harvest_dir: Path) -> int:
    """Source tasks of a store, from its manifest alone (before any array is read)."""
    from .store import FeatureStore

    try:
        manifest = FeatureStore(harvest_dir).manifest()
    except (ValueError, OSError) as exc:
        raise CLIError(f"cannot read the harvest in {str(harvest_dir)!r}: {exc}") from None
    splits = {name: v.get("shards", []) for name, v in manifest["splits"].items()}
    for split in ("source", "target"):
        if not splits.get(split):
            stored = sorted(s for s, shards in splits.items() if shards)
            raise CLIError(
                f"the harvest in {str(harvest_dir)!r} has no {split!r} split (stored splits: {stored}); "
                "it is incomplete: re-run the harvest"
            )
    return len({v for shard in splits["source"] for v in shard.get("task_values", [])})


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
    if isinstance(data, dict) and data.get("format") == "lightning-ksm-report":
        data = (data.get("config") or {}).get("analysis")
        if not isinstance(data, dict):
            raise CLIError(f"--config {path!r} is a report without analysis settings (config.analysis)")
    elif isinstance(data, dict) and set(data) == {"analysis"} and isinstance(data["analysis"], dict):
        data = data["analysis"]
    if not isinstance(data, dict):
        raise CLIError(f"--config {path!r} must hold a JSON object of analysis settings")
    unknown = sorted(set(data) - set(_BY_FIELD))
    if unknown:
        raise CLIError(
            f"--config {path!r} has unknown setting(s) {unknown}; known settings: {sorted(_BY_FIELD)}"
        )
    out = {}
    for name, value in data.items():
        try:
            out[name] = _BY_FIELD[name].parse(value)
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"--config {path!r}: setting {name!r} {exc}") from None
    return out


def _resolve_settings(args: argparse.Namespace, n_tasks: int):
    """AnalysisConfig from defaults < --config < options, validated; errors name the option."""
    from .analysis import AnalysisConfig

    settings: dict = {}
    origin: dict = {}
    if args.config is not None:
        settings = _read_config_file(args.config)
        origin = {name: f"--config {args.config!r}:" for name in settings}
    given = {s.field: getattr(args, s.field) for s in _SETTINGS if hasattr(args, s.field)}
    if "subset_p" in given:
        given.setdefault("subset_size", None)  # an explicit --subset-p overrides a size from --config
    settings.update(given)
    origin.update({name: f"argument {_BY_FIELD[name].flag}:" for name in given})
    config = AnalysisConfig(**settings)
    try:
        config.validate(n_tasks)
    except ValueError as exc:
        message = str(exc)
        # AnalysisConfig.validate starts its messages with the field name: point at the option.
        for name in sorted(_BY_FIELD, key=len, reverse=True):
            if message.startswith(name + " "):
                where = origin.get(name, f"argument {_BY_FIELD[name].flag}:")
                raise CLIError(f"{where} {message}") from None
        raise CLIError(f"{message} (harvest in {args.dir!r})") from None
    return config


def _resolve_out(args: argparse.Namespace, harvest_dir: Path) -> Path:
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = harvest_dir.parent / f"report-{stamp}"
        n = 2
        while out.exists():  # never reuse a directory: two runs in one second get -2, -3, ...
            out = harvest_dir.parent / f"report-{stamp}-{n}"
            n += 1
        return out
    out = Path(args.out)
    resolved, harvest = out.resolve(), harvest_dir.resolve()
    if resolved == harvest or harvest in resolved.parents:
        raise CLIError(f"argument --out: {args.out!r} is inside the harvest {str(harvest_dir)!r}; choose another directory")
    if out.exists() and not out.is_dir():
        raise CLIError(f"argument --out: {args.out!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CLIError(
            f"argument --out: {args.out!r} exists and is not empty; pass --force to overwrite it or "
            "choose another directory"
        )
    return out


def _carried_config(harvest_dir: Path) -> dict:
    """How the harvest was made, from the callback's report next to it (if any): kept for provenance."""
    path = harvest_dir.parent / "report" / "report.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        config = payload.get("config") if payload.get("format") == "lightning-ksm-report" else None
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(config, dict):
        return {}
    # "analysis" is the new run's; "harvest" is re-read from the store's manifest.
    return {k: v for k, v in config.items() if k not in ("analysis", "harvest", "cli")}


def _cmd_analyze(args: argparse.Namespace) -> int:
    harvest_dir = _find_harvest(args.dir)
    n_tasks = _source_task_count(harvest_dir)
    config = _resolve_settings(args, n_tasks)
    out = _resolve_out(args, harvest_dir)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    from .analysis import analyze_store

    extra = _carried_config(harvest_dir)
    extra["cli"] = {"command": "analyze", "harvest_dir": str(harvest_dir.resolve()),
                    "config_file": None if args.config is None else str(Path(args.config).resolve())}
    start = time.perf_counter()
    try:
        report = analyze_store(harvest_dir, config, progress=progress, extra_config=extra)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Settings were checked above, so this is the stored data (e.g. a corrupt or empty split).
        raise CLIError(f"the analysis of {str(harvest_dir)!r} failed: {exc}") from None
    seconds = time.perf_counter() - start
    try:
        report.save(out)
    except OSError as exc:
        raise CLIError(f"cannot write the report to {str(out)!r}: {exc}", status=1) from None
    print(f"report written to {out.resolve()} ({seconds:.1f} s)")
    print(_summary(report, config))
    print(f"full tables: {PROG} show {shlex.quote(str(out))}")
    return 0


def _num(value: Any, spec: str) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(float(value), spec) if ok else "n/a"


def _summary(report, config) -> str:
    """A few lines: size of the run, fit quality, top tasks and best subset of the default target."""
    fq = report.fit_quality
    lines = [
        f"  {report.n_tasks} source tasks, {report.n_targets} targets, {config.n_subsets} subsets "
        f"(seed {config.seed}), kernel {config.kernel}",
        f"  surrogate held-out LDS {_num(fq.get('heldout_lds'), '.3f')} "
        f"(linear surrogate {_num(fq.get('linear_heldout_lds'), '.3f')})",
    ]
    from .report import _terminal_safe as safe  # task names are user data: no escape sequences

    target = report.default_target
    helps = ", ".join(f"{safe(t)} ({v:+.3g})" for t, v in report.top_helpers(3, target)) or "none"
    hurts = ", ".join(f"{safe(t)} ({v:+.3g})" for t, v in report.top_hurters(3, target)) or "none"
    lines.append(f"  target {safe(target)!r}: helps most: {helps}; hurts most: {hurts}")
    for entry in report.best_subsets:
        if entry["target"] == target:
            lines.append(
                f"  best subset for {safe(target)!r}: {{{', '.join(safe(t) for t in entry['tasks'])}}} "
                f"(predicted loss {_num(entry.get('predicted_loss'), '.4g')})"
            )
    return "\n".join(lines)


# -- show ----------------------------------------------------------------------------------------


def _find_report(directory: str) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CLIError(f"DIR {directory!r} does not exist")
    if path.is_file() and path.name == "report.json":
        return path.parent
    if not path.is_dir():
        raise CLIError(f"DIR {directory!r} is not a directory")
    if (path / "report.json").is_file():
        return path
    if (path / "report" / "report.json").is_file():
        return path / "report"
    others = sorted(p.parent.name for p in path.glob("report*/report.json"))
    if others:
        raise CLIError(f"no report in DIR {directory!r} itself; reports found under it: {others} (pass one of them)")
    raise CLIError(
        f"no report in DIR {directory!r}: expected {str(path / 'report.json')!r} (a report directory) "
        f"or {str(path / 'report' / 'report.json')!r} (a TaskAttribution output directory)"
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


def _cmd_show(args: argparse.Namespace) -> int:
    from .report import AttributionReport

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


def _plain_json(obj: Any) -> Any:
    """Replace non-finite floats (anywhere) by None so that the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    return obj


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-ksm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Never raises SystemExit itself (``--help``, ``--version`` and usage errors return their status),
    so tests can call it in-process; the console script passes the status to ``sys.exit``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error already printed (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return args.handler(args)
    except CLIError as exc:
        print(f"{args.parser.prog}: error: {exc}\n(see: {args.parser.prog} --help)", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lightning-ksm show ... | head`: the reader left; stop quietly, without a second error
        # when Python flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
