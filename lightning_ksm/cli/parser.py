"""The ``lightning-ksm`` argument parser: the commands, their help, and the analysis options.

The analysis options are generated from :mod:`lightning_ksm.config` (see :mod:`.options`); this
module only adds the command-line texts and the options that are not settings (--out, --config...).
"""

from __future__ import annotations

import argparse

from ._base import PROG
from .analyze import run_analyze
from .options import EXCLUSIVE, SettingOption, analysis_options
from .show import parse_rows, run_show

__all__ = ["build_parser"]

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
(report-<date>-<time>, created exclusively: concurrent analyses get -2, -3, ... suffixes) unless
--out is given. --out must be missing or empty, and is claimed before the analysis starts: a second
analysis into the same OUT is refused at once. --force replaces the report saved in OUT (never
other files): the new report is written next to it and moved in whole when it is complete.

An incomplete or damaged harvest (a killed run, a DDP rank that died, a shard that fails its
checksum) is refused with exit status 3; --allow-partial analyses what is stored anyway, leaving
damaged shards out (each is named), and marks the report as partial. Exit status 2: bad arguments;
1: the report could not be written.

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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions; give option help a bit more room."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _argparse_type(option: SettingOption):
    """The option's parser in argparse's form: errors read "argument --flag: <config's message>"."""

    def parse(value: str):
        try:
            return option.parse(value)
        except ValueError as exc:  # on the command line None is written 'auto'
            raise argparse.ArgumentTypeError(str(exc).replace(" or None,", " or auto,")) from None

    parse.__name__ = option.name  # argparse names the type in some messages
    return parse


def _add_analysis_options(analyze: argparse.ArgumentParser) -> None:
    group = analyze.add_argument_group(
        "analysis settings", "Each option sets the AnalysisConfig field of the same name; "
        "'auto' resets an optional setting."
    )
    exclusive = group.add_mutually_exclusive_group()
    for option in analysis_options():
        target = exclusive if option.name in EXCLUSIVE else group
        target.add_argument(
            option.flag, dest=option.name, type=_argparse_type(option), metavar=option.metavar,
            default=argparse.SUPPRESS,  # absent unless given: --config values are not overridden
            help=option.help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-ksm`` argument parser (subcommands ``analyze`` and ``show``)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description=_DESCRIPTION, epilog=_MAIN_EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    analyze = sub.add_parser(
        "analyze", help="re-run the analysis of a saved harvest with new settings",
        usage=f"{PROG} analyze DIR [--out OUT] [--force] [--config FILE] [--allow-partial] [--[no-]progress] "
              "[SETTINGS...]",
        description=_ANALYZE_DESCRIPTION, epilog=_ANALYZE_EPILOG, formatter_class=_Formatter,
    )
    analyze.add_argument("dir", metavar="DIR", help="harvest directory, or the callback's output directory")
    analyze.add_argument("--out", metavar="OUT",
                         help="report directory (default: a new report-<date>-<time> next to the harvest)")
    analyze.add_argument("--force", action="store_true", help="replace the report saved in OUT (atomically; other files are never deleted)")
    analyze.add_argument("--config", metavar="FILE",
                         help="JSON file of analysis settings, or a saved report.json to reuse its settings")
    analyze.add_argument("--allow-partial", action="store_true",
                         help="analyse an incomplete or damaged harvest anyway, without what is missing or damaged "
                              "(the report says it is partial and names what was left out)")
    analyze.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="show progress bars (default: when stderr is a terminal)")
    _add_analysis_options(analyze)

    show = sub.add_parser(
        "show", help="print a saved report: ranked tasks, interactions, subsets, groups",
        description=_SHOW_DESCRIPTION, epilog=_SHOW_EPILOG, formatter_class=_Formatter,
    )
    show.add_argument("dir", metavar="DIR", help="report directory, or the callback's output directory")
    show.add_argument("--target", metavar="NAME", help="show only this target (default: every target)")
    show.add_argument("--method", metavar="METHOD",
                      help="score method to rank by, e.g. ensemble, loo, linear (default: the report's)")
    show.add_argument("--rows", metavar="N", type=parse_rows, default=argparse.SUPPRESS,
                      help="tasks shown per target, or 'all' (default: 10; with --json: all)")
    show.add_argument("--json", action="store_true", help="print a machine-readable JSON summary instead")
    analyze.set_defaults(handler=run_analyze, parser=analyze)
    show.set_defaults(handler=run_show, parser=show)
    return parser
