"""The run directory: the one place that knows where a run's files go.

Layout of a callback's output directory (by default ``<logger log dir>/ksm``)::

    w0.pt        the W0 snapshot (parameters and buffers; the RL callback: the SAC snapshot)
    harvest/     the feature store (:class:`~lightning_ksm.store.FeatureStore`)
    report/      the attribution report (:class:`~lightning_ksm.report.AttributionReport`)

Re-analyses from the command line write ``report-<date>-<time>`` directories next to ``harvest/``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

__all__ = ["RunDirectory", "KSM_DIRNAME", "W0_FILENAME", "HARVEST_DIRNAME", "REPORT_DIRNAME"]

KSM_DIRNAME = "ksm"
W0_FILENAME = "w0.pt"
HARVEST_DIRNAME = "harvest"
REPORT_DIRNAME = "report"


@dataclass(frozen=True)
class RunDirectory:
    """Paths of one run's W0 snapshot, harvest and report under ``root``."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.fspath(self.root))

    @classmethod
    def under(cls, parent: str) -> "RunDirectory":
        """The run directory ``<parent>/ksm`` (the default place inside a log directory)."""
        return cls(os.path.join(os.fspath(parent), KSM_DIRNAME))

    @property
    def w0(self) -> str:
        return os.path.join(self.root, W0_FILENAME)

    @property
    def harvest(self) -> str:
        return os.path.join(self.root, HARVEST_DIRNAME)

    @property
    def report(self) -> str:
        return os.path.join(self.root, REPORT_DIRNAME)

    @classmethod
    def find(cls, path: str, part: str, marker: str) -> str | None:
        """Where ``part`` ("harvest" or "report") of a run is, given a folder a user points at: the
        folder itself, its ``<part>/`` (a run directory) or its ``ksm/<part>/`` (a Lightning log
        folder); the first that holds ``marker`` (e.g. ``manifest.json``), else None."""
        path = os.fspath(path)
        for candidate in (path, getattr(cls(path), part), getattr(cls.under(path), part)):
            if os.path.isfile(os.path.join(candidate, marker)):
                return candidate
        return None

    def earlier_run(self) -> list[str]:
        """Names of an earlier run's files here (``harvest``, ``w0.pt``), if any."""
        return [os.path.basename(p) for p in (self.harvest, self.w0) if os.path.exists(p)]

    def clear(self, *, report: bool = True) -> None:
        """Delete the harvest, W0 and (unless ``report=False``) the report; other files stay."""
        for path in (self.harvest, self.report) if report else (self.harvest,):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(self.w0):
            os.remove(self.w0)
