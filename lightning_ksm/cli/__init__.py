"""The ``lightning-ksm`` command line: re-analyse a saved harvest, print a saved report.

``lightning-ksm analyze DIR`` re-runs GradEx, the kernel surrogate and the readouts on the features
that a :class:`~lightning_ksm.TaskAttribution` run (or :func:`lightning_ksm.harvest` with a
store) saved, with new analysis settings; the model is not needed. ``lightning-ksm show DIR`` prints
a saved :class:`~lightning_ksm.AttributionReport` as ranked tables, or as JSON.

Exit codes: 0 success; 2 bad input (unknown option, invalid setting, a directory without a harvest or
report, unknown target or method, an --out that is taken), with a one-line message and no traceback;
3 an incomplete or damaged harvest (``analyze``; ``--allow-partial`` analyses it anyway where that is
possible); 1 a failure while writing the report; 130 interrupted.

Modules: :mod:`.parser` builds the options (the analysis settings come from
:mod:`lightning_ksm.config`), :mod:`.analyze` and :mod:`.show` run the two commands, :mod:`.outdir`
takes the report directory of ``analyze`` before the analysis and moves the report in whole.
This package never imports Lightning: it only needs the engine.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ._base import PROG, CLIError
from .parser import build_parser

__all__ = ["main", "build_parser", "CLIError"]


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
