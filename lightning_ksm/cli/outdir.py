"""Where ``lightning-ksm analyze`` writes its report: taken before the analysis, filled whole after it.

- No ``--out``: a new ``report-<date>-<time>`` next to the harvest, created exclusively (mkdir is
  atomic: two analyses started in the same second get ``-2``, ``-3``, ...); the report is saved into it.
- ``--out DIR``: DIR must be missing or empty. It is claimed before the analysis by creating
  ``DIR/.analysis-in-progress`` exclusively, so of two analyses into one DIR the second is refused at
  once (naming ``--force``) instead of silently replacing the first one's report after its own work.
- ``--out DIR --force``: DIR may hold a saved report, which is replaced; files that are not part of
  that report are never deleted (such a DIR is refused, naming them).

With ``--out`` the report is written into a hidden directory next to DIR and moved into place whole
(renames), so DIR holds the old report or the new one, never a mix of two or a half-written one; if
that move fails, the finished report is kept where it was written and the error names it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

from ..report.files import saved_report_files
from ._base import CLIError

__all__ = ["CLAIM", "ReportDir"]

#: The file that marks a ``--out`` directory as taken by an analysis that is running (or was killed).
CLAIM = ".analysis-in-progress"


class ReportDir:
    """The report directory of one analysis: :meth:`new` or :meth:`take`, then :meth:`publish` the
    report, or :meth:`release` it when the analysis fails."""

    def __init__(self, path: Path, *, staged: bool, created: bool, claimed: bool) -> None:
        self.path, self._staged, self._created, self._claimed = path, staged, created, claimed

    @classmethod
    def new(cls, parent: Path) -> "ReportDir":
        """A fresh ``report-<date>-<time>`` directory in ``parent``, created exclusively."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 10_000):
            out = parent / (f"report-{stamp}" if n == 1 else f"report-{stamp}-{n}")
            try:
                out.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise CLIError(f"cannot create the report directory {str(out)!r}: {exc.strerror or exc}",
                               status=1) from None
            return cls(out, staged=False, created=True, claimed=False)
        raise CLIError(f"too many report directories named report-{stamp}* in {str(parent)!r}")

    @classmethod
    def take(cls, out: Path, *, force: bool) -> "ReportDir":
        """``--out``: claimed for this analysis (see the module docstring); refused with a CLIError."""
        if out.exists() and not out.is_dir():
            raise CLIError(f"argument --out: {str(out)!r} exists and is not a directory")
        created = False
        if not out.exists():
            try:
                out.mkdir(parents=True)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise CLIError(f"argument --out: cannot create {str(out)!r}: {exc.strerror or exc}", status=1) from None
        taken = cls(out, staged=True, created=created, claimed=False)
        if force:
            taken._check_replaceable()
            return taken
        if _entries(out):
            taken.release()
            raise CLIError(_refusal(out))
        try:
            fd = os.open(out / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another analysis claimed it between the listing and here
            raise CLIError(_refusal(out)) from None
        except OSError as exc:
            raise CLIError(f"argument --out: cannot write into {str(out)!r}: {exc.strerror or exc}", status=1) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        taken._claimed = True
        return taken

    def _check_replaceable(self) -> None:
        foreign = sorted(_entries(self.path) - saved_report_files(self.path) - {CLAIM})
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise CLIError(f"argument --out: {str(self.path)!r} holds files that are not part of a saved report "
                           f"({shown}); --force replaces only a report, never other files: choose another directory")

    def release(self) -> None:
        """Undo what :meth:`new` or :meth:`take` did (the analysis failed): the claim, a directory it made."""
        if self._claimed:
            with contextlib.suppress(OSError):
                os.remove(self.path / CLAIM)
            self._claimed = False
        if self._created:
            with contextlib.suppress(OSError):  # only while still empty
                self.path.rmdir()

    def publish(self, report) -> None:
        """Save ``report`` here (see the module docstring). OSError: it could not be written."""
        if not self._staged:
            report.save(self.path)
            return
        staging = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            report.save(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            self._move_in(staging)
        except (OSError, CLIError) as exc:
            raise CLIError(f"the report is complete in {str(staging)!r} but could not be moved to {str(self.path)!r} "
                           f"({exc}); nothing was replaced: move it there yourself", status=1) from None

    def _move_in(self, staging: Path) -> None:
        out = self.path
        if self._claimed:  # DIR holds only this analysis's claim: free it, move the report in
            os.remove(out / CLAIM)
            self._claimed = False
            os.rmdir(out)  # fails if anything else appeared in it meanwhile
            os.rename(staging, out)
            return
        for attempt in range(5):  # --force: the old report aside, the new one in, the old one removed
            self._check_replaceable()
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out, trash)
            except FileNotFoundError:
                trash = None
            try:
                os.rename(staging, out)
            except OSError:  # e.g. another --force analysis moved its report in just now
                if trash is not None:
                    with contextlib.suppress(OSError):
                        os.rename(trash, out)  # the old report back, unless a newer one took its place
                    shutil.rmtree(trash, ignore_errors=True)
                if attempt == 4:
                    raise
                continue
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            return


def _entries(path: Path) -> set:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def _refusal(out: Path) -> str:
    if CLAIM in _entries(out):
        return (f"argument --out: {str(out)!r} is taken by another analysis that is writing its report there (or "
                f"one that was killed: then remove {str(out / CLAIM)!r}); choose another directory, or pass --force "
                "to replace its report")
    return (f"argument --out: {str(out)!r} exists and is not empty; pass --force to replace the report in it or "
            "choose another directory")
