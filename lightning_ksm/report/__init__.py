"""The result of a task-attribution run, and how it is stored, printed, drawn and logged.

One job per module:

- :mod:`.data`: the :class:`AttributionReport` dataclass (fields, validation, queries);
- :mod:`.validation`: the checks its constructor runs on names, interactions and entries;
- :mod:`.files`: ``save``/``load`` (``report.json``, CSV and NPY files; the list of files);
- :mod:`.text`: the plain-text summary for a terminal;
- :mod:`.html`: the self-contained HTML page, with the inline SVG heatmaps of :mod:`.svg`;
- :mod:`.figures`: the optional matplotlib PNG heatmaps;
- :mod:`.metrics`: the flat metric dict for loggers.
"""

from __future__ import annotations

from .data import AttributionReport, collect_versions
from .files import REPORT_FORMAT, REPORT_FORMAT_VERSION
from .text import terminal_safe as _terminal_safe  # noqa: F401  (the name lightning_ksm.cli imports)

__all__ = ["AttributionReport", "collect_versions", "REPORT_FORMAT", "REPORT_FORMAT_VERSION"]
