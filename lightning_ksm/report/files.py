"""Saving and loading an :class:`~lightning_ksm.report.AttributionReport`: JSON, CSV and NPY files.

Files written by :func:`save_report` (all atomically through :mod:`lightning_ksm.fileio`,
``report.json`` last):

==========================  ====================================================================
``report.json``             the source of truth for :meth:`AttributionReport.load`: names, config,
                            seeds, versions, timings, fit quality, best subsets, groups, and the
                            ``(K, T)`` score arrays as nested lists (exact float round trip;
                            non-finite floats are written as ``{"$float": "NaN"}`` so the file is
                            strict JSON); a ``files`` manifest with SHA-256 of every other file.
``scores.csv``              default method; one row per source task, one column per target.
``scores_<method>.csv``     the same table for every other method.
``interactions.csv``        long format ``target,task_i,task_j,interaction`` for i < j (task order).
``interactions.npy``        the ``(T, K, K)`` interaction array (exact; read by ``load``). Kept out of
                            report.json because it grows as K^2: at K=500, T=10 it would make the
                            JSON 60 MB and slow to write and parse.
``intervals.csv``           bootstrap intervals of every score, interaction, best subset and group
                            (when the report has them; ``report.json`` has them too).
``best_subsets.json``       copy of the best subsets (convenience; ``report.json`` has them too).
``groups.json``             copy of the co-training groups (convenience).
``subsets.npy``             surrogate training subsets, ``(m, K)`` bool (when present).
``losses.npy``              GradEx losses F^ on those subsets, ``(m, T)`` float64 (when present).
``report.html``             one self-contained page with heatmaps and tables (no network).
``scores.png`` etc.         only when matplotlib is importable (never required).
==========================  ====================================================================

CSV floats are written with Python's shortest round-trip ``repr`` (``nan``/``inf`` for non-finite), so
``float(cell)`` gives back the stored value exactly. Text cells (task and target names) that start
with ``=``, ``+``, ``-``, ``@``, a tab or a CR are prefixed with ``'`` so that a spreadsheet shows
them as text instead of running them as a formula (CSV injection); ``report.json`` keeps the names
as they are. Files get the permissions of the process's umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..fileio import atomic_write_bytes, fsync_dir
from .figures import render_figures
from .intervals import intervals_csv

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["save_report", "load_report", "saved_report_files", "REPORT_FORMAT", "REPORT_FORMAT_VERSION"]

REPORT_FORMAT = "lightning-ksm-report"
REPORT_FORMAT_VERSION = 1

_FLOAT_TAG = "$float"
_FILE_MODE = None  # report files get the permissions the process's umask gives


# ----------------------------------------------------------------------------------------------
# JSON helpers: in memory everything is plain Python (float nan allowed); on disk non-finite floats
# are tagged so that report.json stays strict JSON that any parser accepts.


def _plain(obj: Any, where: str) -> Any:
    """Convert numpy scalars/arrays, tuples and paths to plain JSON-able Python; reject the rest."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has the key {key!r} of type {type(key).__name__}; "
                    "keys must be strings so that the report can be saved as JSON"
                )
            out[key] = _plain(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where} holds a value of type {type(obj).__name__}, which cannot be saved as JSON; "
        "use numbers, strings, booleans, None, lists and dicts"
    )


def _encode(obj: Any) -> Any:
    """Tag non-finite floats so that json.dumps(allow_nan=False) accepts the result."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, dict):
        if len(obj) == 1 and _FLOAT_TAG in obj:
            return float(obj[_FLOAT_TAG])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as the UTF-8 strict-JSON bytes written to disk (non-finite floats tagged)."""
    return (json.dumps(_encode(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_field(text: str) -> str:
    """One RFC-4180 CSV field: quoted when it holds a comma, a quote, CR or LF.

    (csv.writer with lineterminator="\\n" leaves a lone CR unquoted, which breaks readers.)
    A cell a spreadsheet would run as a formula gets a leading ``'`` (see the module docstring).
    """
    if text[:1] in _FORMULA_START:
        text = "'" + text
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def save_report(report: "AttributionReport", directory: str | os.PathLike, *, figures: bool | str = "auto") -> dict:
    """Write every report file into ``directory``; see :meth:`AttributionReport.save`."""
    if figures not in (True, False, "auto"):
        raise ValueError(f"figures must be True, False or 'auto', got {figures!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _previous_files(directory)

    blobs: dict = {}
    blobs["scores.csv"] = _scores_csv(report, report.default_method)
    for method in report.methods[1:]:
        blobs[f"scores_{method}.csv"] = _scores_csv(report, method)
    if report.interactions is not None:
        blobs["interactions.csv"] = _interactions_csv(report)
        blobs["interactions.npy"] = _npy_bytes(report.interactions)
    if (intervals := intervals_csv(report, _csv_field)) is not None:
        blobs["intervals.csv"] = intervals
    blobs["best_subsets.json"] = _json_bytes(report.best_subsets)
    blobs["groups.json"] = _json_bytes(report.groups)
    if report.subsets is not None:
        blobs["subsets.npy"] = _npy_bytes(report.subsets)
    if report.losses is not None:
        blobs["losses.npy"] = _npy_bytes(report.losses)
    blobs["report.html"] = report.to_html().encode("utf-8")
    if figures is not False:
        blobs.update(render_figures(report, required=figures is True))

    written = {}
    for name, data in blobs.items():
        atomic_write_bytes(directory / name, data, mode=_FILE_MODE)
        written[name] = directory / name

    payload = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        **report._json_fields(),
        "scores": {m: report.scores[m].tolist() for m in report.methods},
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in blobs.items()
        },
    }
    atomic_write_bytes(directory / "report.json", _json_bytes(payload), mode=_FILE_MODE)
    written["report.json"] = directory / "report.json"

    for name in previous - set(written):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    fsync_dir(directory)
    return written


def saved_report_files(directory: str | os.PathLike) -> set:
    """The files of the report saved in ``directory``: ``report.json`` and the files it lists (empty
    when ``directory`` holds no saved report). What a command may replace without losing other files."""
    directory = Path(directory)
    return _previous_files(directory) | {"report.json"} if _is_report(directory / "report.json") else set()


def _is_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _previous_files(directory: Path) -> set:
    """Names an older report.json in ``directory`` says it wrote (plain names only)."""
    try:
        old = json.loads((directory / "report.json").read_text(encoding="utf-8"))
        names = old.get("files", {}) if old.get("format") == REPORT_FORMAT else {}
    except (OSError, ValueError, AttributeError):
        return set()
    # Never follow a path out of the directory, whatever the old file says.
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}


def _scores_csv(report: "AttributionReport", method: str) -> bytes:
    lines = [",".join(_csv_field(x) for x in ["task", *report.target_names])]
    for k, task in enumerate(report.task_names):
        lines.append(",".join([_csv_field(task), *map(repr, report.scores[method][k].tolist())]))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _interactions_csv(report: "AttributionReport") -> bytes:
    # Hand-joined: this table has T*K*(K-1)/2 rows (1.2 M at K=500, T=10), where per-row
    # csv.writer calls took 4 s.
    iu, ju = np.triu_indices(report.n_tasks, k=1)
    names = [_csv_field(n) for n in report.task_names]
    pairs = [f"{names[i]},{names[j]}," for i, j in zip(iu.tolist(), ju.tolist())]
    parts = ["target,task_i,task_j,interaction\n"]
    for t, target in enumerate(report.target_names):
        head = _csv_field(target) + ","
        # tolist() gives Python floats, whose repr is the exact shortest form (nan/inf too)
        vals = report.interactions[t, iu, ju].tolist()
        parts.append("".join(f"{head}{p}{v!r}\n" for p, v in zip(pairs, vals)))
    return "".join(parts).encode("utf-8")


def load_report(cls: type, directory: str | os.PathLike) -> "AttributionReport":
    """Read the report that :func:`save_report` wrote, as a ``cls``; see :meth:`AttributionReport.load`."""
    directory = Path(directory)
    if directory.name == "report.json" and directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"report directory {str(directory)!r} does not exist")
    path = directory / "report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is missing: {str(directory)!r} does not hold a saved AttributionReport"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); the report file is corrupt") from exc
    if not isinstance(payload, dict) or payload.get("format") != REPORT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a lightning-ksm report (missing 'format': {REPORT_FORMAT!r})")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > REPORT_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {version!r}; this lightning-ksm reads up to "
            f"{REPORT_FORMAT_VERSION}: upgrade lightning-ksm"
        )
    payload = _decode(payload)
    required = ("task_names", "target_names", "scores", "default_method")
    missing = [k for k in required if k not in payload]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the keys {missing}; the report file is corrupt")

    files = payload.get("files") or {}
    arrays = {}
    for name, key in (("subsets.npy", "subsets"), ("losses.npy", "losses"), ("interactions.npy", "interactions")):
        if name not in files:
            continue
        apath = directory / name
        if not apath.is_file():
            raise FileNotFoundError(f"{str(apath)!r} is missing; report.json lists it")
        data = apath.read_bytes()
        want = files[name].get("sha256") if isinstance(files[name], dict) else None
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(
                f"{str(apath)!r} does not match the checksum in report.json (it is corrupt, or "
                "from another save)"
            )
        try:
            arrays[key] = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{str(apath)!r} is not a readable .npy file ({exc})") from exc

    try:
        return cls(
            task_names=payload["task_names"],
            target_names=payload["target_names"],
            scores={m: np.asarray(v, dtype=np.float64) for m, v in payload["scores"].items()},
            default_method=payload["default_method"],
            interactions=arrays.get("interactions"),
            best_subsets=payload.get("best_subsets", []),
            groups=payload.get("groups", []),
            fit_quality=payload.get("fit_quality", {}),
            intervals=payload.get("intervals", {}),
            subsets=arrays.get("subsets"),
            losses=arrays.get("losses"),
            config=payload.get("config", {}),
            seeds=payload.get("seeds", {}),
            timings=payload.get("timings", {}),
            versions=payload.get("versions", {}),
            created_at=payload.get("created_at", ""),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r} holds an inconsistent report: {exc}") from exc
