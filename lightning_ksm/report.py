"""The result of a task-attribution run, and how it is stored, printed and logged.

An :class:`AttributionReport` holds what the readouts produce (per-task scores for every target,
pairwise interactions, best subsets, co-training groups), how well the surrogate fitted, the data it
was fitted on, and everything needed to reproduce it (config, seeds, package versions, timings).

Sign conventions (F is a loss, lower is better):

- ``scores[method][k, t]`` is the predicted increase of target ``t``'s loss when source task ``k`` is
  removed: **score > 0 means the task helps the target**, < 0 means it hurts.
- ``interactions[t, i, j] = g(1) - g(1-e_i) - g(1-e_j) + g(1-e_i-e_j)``: **< 0 is synergy**
  (removing both costs less than the two single removals added together: each task's benefit is
  larger when the other is present, the pair helps more together), **> 0 is antagonism /
  redundancy**.

Files written by :meth:`AttributionReport.save` (all atomically, ``report.json`` last):

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
``best_subsets.json``       copy of the best subsets (convenience; ``report.json`` has them too).
``groups.json``             copy of the co-training groups (convenience).
``subsets.npy``             surrogate training subsets, ``(m, K)`` bool (when present).
``losses.npy``              GradEx losses F^ on those subsets, ``(m, T)`` float64 (when present).
``report.html``             one self-contained page with heatmaps and tables (no network).
``scores.png`` etc.         only when matplotlib is importable (never required).
==========================  ====================================================================

CSV floats are written with Python's shortest round-trip ``repr`` (``nan``/``inf`` for non-finite), so
``float(cell)`` gives back the stored value exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["AttributionReport", "collect_versions", "REPORT_FORMAT", "REPORT_FORMAT_VERSION"]

REPORT_FORMAT = "lightning-ksm-report"
REPORT_FORMAT_VERSION = 1

# Distribution names looked up for ``versions``; keys are the names shown in the report.
_VERSION_DISTS = {
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "lightning": "lightning",
    "lightning_ksm": "lightning-ksm",
}

# Method names end up in file names (scores_<method>.csv), so keep them to a safe alphabet.
_METHOD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FLOAT_TAG = "$float"


def collect_versions() -> dict:
    """Versions of Python and the packages that shape a report's numbers; missing ones are omitted."""
    out = {"python": platform.python_version()}
    for key, dist in _VERSION_DISTS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    return (json.dumps(_encode(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Atomic file writes: a reader sees either the old file or the complete new one, never a torn one.


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; report files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable; not supported everywhere (e.g. Windows), where it is skipped.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _csv_field(text: str) -> str:
    """One RFC-4180 CSV field: quoted when it holds a comma, a quote, CR or LF.

    (csv.writer with lineterminator="\\n" leaves a lone CR unquoted, which breaks readers.)
    """
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _check_names(names: Any, field_name: str) -> list:
    if isinstance(names, str) or not isinstance(names, Sequence) and not isinstance(names, np.ndarray):
        raise TypeError(f"{field_name} must be a list of strings, got {type(names).__name__}")
    names = [str(n) if isinstance(n, str) else n for n in names]  # np.str_ -> str
    if not names:
        raise ValueError(f"{field_name} must not be empty")
    seen: dict = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{field_name}[{i}] must be a string, got {type(name).__name__} {name!r}")
        if name == "":
            raise ValueError(f"{field_name}[{i}] is an empty string; every name must be non-empty")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field_name}[{i}]={name!r} cannot be written as UTF-8 (lone surrogate)") from None
        if name in seen:
            raise ValueError(
                f"{field_name} has the duplicate name {name!r} (positions {seen[name]} and {i}); "
                "names must be unique"
            )
        seen[name] = i
    return names


def _terminal_safe(text: str) -> str:
    # Task names come from user data: keep escape sequences and newlines out of the terminal.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format(float(v), spec)
    return str(v)


def _metric_keys(names: list) -> list:
    """Logger-safe metric name parts: [A-Za-z0-9_.-] only, made unique with an index suffix."""
    keys = [re.sub(r"[^A-Za-z0-9_.-]", "_", n) for n in names]
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [k if counts[k] == 1 else f"{k}_{i}" for i, k in enumerate(keys)]


# ----------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class AttributionReport:
    """Task-attribution results for K source tasks and T targets, with provenance.

    Args:
        task_names: the K source-task names (unique, non-empty strings).
        target_names: the T target names (unique); a target named ``"all"`` is the default target.
        scores: method name -> ``(K, T)`` array of attribution scores (score > 0: removing the task
            raises the target loss, i.e. the task helps). Method names are used in file names and
            must match ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
        default_method: the method used when none is given; defaults to ``"ensemble"`` when
            present, else the first method in ``scores``.
        interactions: ``(T, K, K)`` symmetric array, or None. ``< 0``: synergy, ``> 0``:
            antagonism / redundancy. The diagonal is ignored.
        best_subsets: list of dicts with at least ``"target"`` (a target name) and ``"tasks"``
            (task names); usually also ``"size"``, ``"predicted_loss"``, ``"full_set_loss"`` and
            ``"exact"``. Other JSON-able keys are kept and shown.
        groups: list of dicts with at least ``"tasks"``; ``"predicted_loss"`` may be a float or a
            dict target -> float.
        fit_quality: JSON-able dict, e.g. ``heldout_lds``, ``heldout_residual_error``,
            ``n_train_subsets``, ``n_heldout_subsets``, ``surrogate``.
        subsets: ``(m, K)`` 0/1 array of the subsets the surrogate was fitted on, or None.
        losses: ``(m, T)`` GradEx losses F^ on those subsets, or None.
        config: JSON-able dict of every setting of the run.
        seeds: JSON-able dict of seeds (an int is stored as ``{"seed": n}``).
        timings: stage name -> seconds.
        versions: package versions; collected with :func:`collect_versions` when None.
        created_at: ISO-8601 timestamp; now (UTC) when None.

    Numpy scalars, tuples and paths inside the dict fields are converted to plain JSON types at
    construction, so a report equals the one :meth:`load` gives back after :meth:`save`.
    """

    task_names: Sequence[str]
    target_names: Sequence[str]
    scores: Mapping[str, Any]
    default_method: str | None = None
    interactions: Any = None
    best_subsets: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    fit_quality: dict = field(default_factory=dict)
    subsets: Any = None
    losses: Any = None
    config: dict = field(default_factory=dict)
    seeds: Any = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    versions: dict | None = None
    created_at: str | None = None

    # -- validation ----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.task_names = _check_names(self.task_names, "task_names")
        self.target_names = _check_names(self.target_names, "target_names")
        K, T = len(self.task_names), len(self.target_names)
        self._task_pos = {n: i for i, n in enumerate(self.task_names)}
        self._target_pos = {n: i for i, n in enumerate(self.target_names)}

        if not isinstance(self.scores, Mapping) or not self.scores:
            raise ValueError("scores must be a non-empty dict: method name -> (K, T) array")
        scores = {}
        for method, arr in self.scores.items():
            if not isinstance(method, str) or not _METHOD_RE.match(method):
                raise ValueError(
                    f"scores has the method name {method!r}; method names must match "
                    "[A-Za-z0-9][A-Za-z0-9_.-]* (they are used in file names)"
                )
            a = np.array(arr, dtype=np.float64)  # a copy: the report owns its arrays
            if a.shape != (K, T):
                raise ValueError(
                    f"scores[{method!r}] has shape {a.shape}, expected (K, T) = ({K}, {T}) "
                    f"from len(task_names)={K} and len(target_names)={T}"
                )
            scores[method] = a
        self.scores = scores

        if self.default_method is None:
            self.default_method = "ensemble" if "ensemble" in scores else next(iter(scores))
        if self.default_method not in scores:
            raise ValueError(
                f"default_method={self.default_method!r} is not a key of scores {list(scores)}"
            )

        if self.interactions is not None:
            inter = np.array(self.interactions, dtype=np.float64)
            if inter.shape != (T, K, K):
                raise ValueError(
                    f"interactions has shape {inter.shape}, expected (T, K, K) = ({T}, {K}, {K}) "
                    f"from len(target_names)={T} and len(task_names)={K}"
                )
            self._check_symmetric(inter)
            self.interactions = inter

        self.best_subsets = self._check_entries(self.best_subsets, "best_subsets", need_target=True)
        self.groups = self._check_entries(self.groups, "groups", need_target=False)

        if self.subsets is not None:
            s = np.asarray(self.subsets)
            if s.ndim != 2 or s.shape[1] != K:
                raise ValueError(f"subsets has shape {s.shape}, expected (m, K) with K={K} (len(task_names))")
            if s.dtype != np.bool_:
                if not np.all((s == 0) | (s == 1)):
                    raise ValueError("subsets must hold only 0/1 (or bool) values")
                s = s.astype(bool)
            self.subsets = s.copy()
        if self.losses is not None:
            f = np.array(self.losses, dtype=np.float64)
            if f.ndim != 2 or f.shape[1] != T:
                raise ValueError(f"losses has shape {f.shape}, expected (m, T) with T={T} (len(target_names))")
            self.losses = f
        if self.subsets is not None and self.losses is not None and len(self.subsets) != len(self.losses):
            raise ValueError(
                f"subsets has {len(self.subsets)} rows but losses has {len(self.losses)}; "
                "they must describe the same m subsets"
            )

        if isinstance(self.seeds, (int, np.integer)) and not isinstance(self.seeds, bool):
            self.seeds = {"seed": int(self.seeds)}
        for name in ("fit_quality", "config", "seeds", "timings"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
            setattr(self, name, _plain(value, name))
        for stage, seconds in self.timings.items():
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise TypeError(f"timings[{stage!r}] must be a number of seconds, got {seconds!r}")
        if self.versions is None:
            self.versions = collect_versions()
        elif not isinstance(self.versions, Mapping):
            raise TypeError(f"versions must be a dict, got {type(self.versions).__name__}")
        self.versions = _plain(self.versions, "versions")
        if self.created_at is None:
            self.created_at = _now_iso()
        elif not isinstance(self.created_at, str):
            raise TypeError(f"created_at must be an ISO-8601 string, got {type(self.created_at).__name__}")

    def _check_symmetric(self, inter: np.ndarray) -> None:
        swapped = inter.transpose(0, 2, 1)
        both_nan = np.isnan(inter) & np.isnan(swapped)
        diff = np.where(both_nan, 0.0, np.abs(inter - swapped))
        diff = np.where(np.isnan(diff), np.inf, diff)  # nan on one side only is an asymmetry
        scale = np.abs(np.where(np.isfinite(inter), inter, 0.0))
        # Lenient: the two orders of the same four surrogate values may round differently.
        bad = diff > 1e-9 + 1e-6 * np.maximum(scale, scale.transpose(0, 2, 1))
        if bad.any():
            t, i, j = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(
                f"interactions must be symmetric in the two task axes: interactions[{t}, {i}, {j}]="
                f"{inter[t, i, j]!r} but interactions[{t}, {j}, {i}]={inter[t, j, i]!r} (target "
                f"{self.target_names[t]!r}, tasks {self.task_names[i]!r} and {self.task_names[j]!r})"
            )

    def _check_entries(self, entries: Any, name: str, *, need_target: bool) -> list:
        if entries is None:
            return []
        if isinstance(entries, Mapping) or isinstance(entries, str) or not isinstance(entries, Sequence):
            raise TypeError(f"{name} must be a list of dicts, got {type(entries).__name__}")
        out = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise TypeError(f"{name}[{i}] must be a dict, got {type(entry).__name__}")
            entry = _plain(entry, f"{name}[{i}]")
            tasks = entry.get("tasks")
            if not isinstance(tasks, list):
                raise ValueError(f"{name}[{i}] needs a 'tasks' list of task names")
            for task in tasks:
                if task not in self._task_pos:
                    raise ValueError(f"{name}[{i}]['tasks'] names the unknown task {task!r}; known: {self.task_names[:10]}")
            if len(set(tasks)) != len(tasks):
                raise ValueError(f"{name}[{i}]['tasks'] lists a task twice: {tasks}")
            if "size" in entry and entry["size"] != len(tasks):
                raise ValueError(f"{name}[{i}]['size']={entry['size']!r} but it lists {len(tasks)} tasks")
            if need_target:
                if entry.get("target") not in self._target_pos:
                    raise ValueError(
                        f"{name}[{i}]['target']={entry.get('target')!r} is not one of target_names "
                        f"{self.target_names[:10]}"
                    )
            pl = entry.get("predicted_loss")
            if isinstance(pl, dict):
                for target in pl:
                    if target not in self._target_pos:
                        raise ValueError(f"{name}[{i}]['predicted_loss'] names the unknown target {target!r}")
            out.append(entry)
        return out

    # -- basic accessors -------------------------------------------------------------------------

    @property
    def n_tasks(self) -> int:
        """K, the number of source tasks."""
        return len(self.task_names)

    @property
    def n_targets(self) -> int:
        """T, the number of targets."""
        return len(self.target_names)

    @property
    def methods(self) -> tuple:
        """The score methods, default first."""
        return (self.default_method,) + tuple(m for m in self.scores if m != self.default_method)

    @property
    def default_target(self) -> str:
        """``"all"`` when there is such a target, else the first target."""
        return "all" if "all" in self._target_pos else self.target_names[0]

    def target_index(self, target: str | int | None = None) -> int:
        """Column index of ``target`` (a name or an index); None means :attr:`default_target`."""
        if target is None:
            return self._target_pos[self.default_target]
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if not -self.n_targets <= int(target) < self.n_targets:
                raise ValueError(f"target index {target} is out of range for {self.n_targets} targets")
            return int(target) % self.n_targets
        if target not in self._target_pos:
            raise ValueError(f"unknown target {target!r}; targets are {self.target_names[:20]}")
        return self._target_pos[target]

    def task_index(self, task: str | int) -> int:
        """Row index of source task ``task`` (a name or an index)."""
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if not -self.n_tasks <= int(task) < self.n_tasks:
                raise ValueError(f"task index {task} is out of range for {self.n_tasks} tasks")
            return int(task) % self.n_tasks
        if task not in self._task_pos:
            raise ValueError(f"unknown task {task!r}; tasks are {self.task_names[:20]}")
        return self._task_pos[task]

    def _method(self, method: str | None) -> str:
        method = self.default_method if method is None else method
        if method not in self.scores:
            raise ValueError(f"unknown method {method!r}; this report has {list(self.scores)}")
        return method

    # -- rankings --------------------------------------------------------------------------------

    def ranked(self, target: str | int | None = None, method: str | None = None) -> list:
        """``[(task, score), ...]`` for one target, highest score (most helpful) first.

        Ties keep the task order; NaN scores come last.
        """
        col = self.scores[self._method(method)][:, self.target_index(target)]
        key = np.where(np.isnan(col), np.inf, -col)
        order = np.argsort(key, kind="stable")
        return [(self.task_names[k], float(col[k])) for k in order]

    def top_helpers(self, n: int = 5, target: str | int | None = None, method: str | None = None) -> list:
        """Up to ``n`` tasks with score > 0 (removing them raises the target loss), best first."""
        return [(t, s) for t, s in self.ranked(target, method) if s > 0][: max(int(n), 0)]

    def top_hurters(self, n: int = 5, target: str | int | None = None, method: str | None = None) -> list:
        """Up to ``n`` tasks with score < 0 (removing them lowers the target loss), worst first."""
        return [(t, s) for t, s in reversed(self.ranked(target, method)) if s < 0][: max(int(n), 0)]

    def interaction(self, task_i: str | int, task_j: str | int, target: str | int | None = None) -> float:
        """The pairwise interaction of two tasks for one target (< 0 synergy, > 0 antagonism)."""
        if self.interactions is None:
            raise ValueError("this report has no interactions")
        return float(self.interactions[self.target_index(target), self.task_index(task_i), self.task_index(task_j)])

    def top_pairs(self, n: int = 5, target: str | int | None = None, kind: str = "synergy") -> list:
        """Strongest pairs ``[(task_i, task_j, value), ...]`` for one target.

        ``kind="synergy"``: most negative interactions first (only values < 0);
        ``kind="antagonism"``: most positive first (only values > 0). Each unordered pair once.
        """
        if kind not in ("synergy", "antagonism"):
            raise ValueError(f"kind must be 'synergy' or 'antagonism', got {kind!r}")
        if self.interactions is None:
            return []
        mat = self.interactions[self.target_index(target)]
        iu, ju = np.triu_indices(self.n_tasks, k=1)
        vals = mat[iu, ju]
        sign = 1.0 if kind == "synergy" else -1.0
        keep = np.flatnonzero(sign * vals < 0)
        order = keep[np.argsort(sign * vals[keep], kind="stable")]
        return [(self.task_names[iu[p]], self.task_names[ju[p]], float(vals[p])) for p in order[: max(int(n), 0)]]

    # -- equality / repr -------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttributionReport):
            return NotImplemented

        def same(a: Any, b: Any) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and a.dtype == b.dtype and bool(
                np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
            )

        return (
            self.task_names == other.task_names
            and self.target_names == other.target_names
            and self.default_method == other.default_method
            and list(self.scores) == list(other.scores)
            and all(same(self.scores[m], other.scores[m]) for m in self.scores)
            and same(self.interactions, other.interactions)
            and same(self.subsets, other.subsets)
            and same(self.losses, other.losses)
            and _json_bytes(self._json_fields()) == _json_bytes(other._json_fields())
        )

    __hash__ = None  # mutable, holds arrays

    def __repr__(self) -> str:
        m = None if self.subsets is None else len(self.subsets)
        return (
            f"AttributionReport(K={self.n_tasks} tasks, T={self.n_targets} targets, methods={list(self.methods)}, "
            f"interactions={'yes' if self.interactions is not None else 'no'}, "
            f"best_subsets={len(self.best_subsets)}, groups={len(self.groups)}, m={m}, created_at={self.created_at!r})"
        )

    # -- serialization ---------------------------------------------------------------------------

    def _json_fields(self) -> dict:
        """Free-form (non-array) fields, as plain JSON-able Python."""
        return {
            "task_names": list(self.task_names),
            "target_names": list(self.target_names),
            "default_method": self.default_method,
            "best_subsets": self.best_subsets,
            "groups": self.groups,
            "fit_quality": self.fit_quality,
            "config": self.config,
            "seeds": self.seeds,
            "timings": self.timings,
            "versions": self.versions,
            "created_at": self.created_at,
        }

    def save(self, directory: str | os.PathLike, *, figures: bool | str = "auto") -> dict:
        """Write every report file into ``directory`` (created if needed); see the module docstring.

        Every file is written to a temporary file in the same directory and renamed into place;
        ``report.json`` is written last, so a directory whose ``report.json`` is complete holds a
        complete report. Files listed by an older ``report.json`` there that this report does not
        write (e.g. ``scores_<method>.csv`` of a method no longer present) are removed.

        Args:
            directory: target folder.
            figures: ``"auto"`` writes ``scores.png``/``interactions.png`` when matplotlib can be
                imported; True requires matplotlib; False skips them.

        Returns:
            dict file name -> Path of every file written.
        """
        if figures not in (True, False, "auto"):
            raise ValueError(f"figures must be True, False or 'auto', got {figures!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        previous = self._previous_files(directory)

        blobs: dict = {}
        blobs["scores.csv"] = self._scores_csv(self.default_method)
        for method in self.methods[1:]:
            blobs[f"scores_{method}.csv"] = self._scores_csv(method)
        if self.interactions is not None:
            blobs["interactions.csv"] = self._interactions_csv()
            blobs["interactions.npy"] = _npy_bytes(self.interactions)
        blobs["best_subsets.json"] = _json_bytes(self.best_subsets)
        blobs["groups.json"] = _json_bytes(self.groups)
        if self.subsets is not None:
            blobs["subsets.npy"] = _npy_bytes(self.subsets)
        if self.losses is not None:
            blobs["losses.npy"] = _npy_bytes(self.losses)
        blobs["report.html"] = self.to_html().encode("utf-8")
        if figures is not False:
            blobs.update(_figures(self, required=figures is True))

        written = {}
        for name, data in blobs.items():
            _atomic_write(directory / name, data)
            written[name] = directory / name

        payload = {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            **self._json_fields(),
            "scores": {m: self.scores[m].tolist() for m in self.methods},
            "files": {
                name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in blobs.items()
            },
        }
        _atomic_write(directory / "report.json", _json_bytes(payload))
        written["report.json"] = directory / "report.json"

        for name in previous - set(written):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        _fsync_dir(directory)
        return written

    @staticmethod
    def _previous_files(directory: Path) -> set:
        """Names an older report.json in ``directory`` says it wrote (plain names only)."""
        try:
            old = json.loads((directory / "report.json").read_text(encoding="utf-8"))
            names = old.get("files", {}) if old.get("format") == REPORT_FORMAT else {}
        except (OSError, ValueError, AttributeError):
            return set()
        # Never follow a path out of the directory, whatever the old file says.
        return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}

    def _scores_csv(self, method: str) -> bytes:
        lines = [",".join(_csv_field(x) for x in ["task", *self.target_names])]
        for k, task in enumerate(self.task_names):
            lines.append(",".join([_csv_field(task), *map(repr, self.scores[method][k].tolist())]))
        return ("\n".join(lines) + "\n").encode("utf-8")

    def _interactions_csv(self) -> bytes:
        # Hand-joined: this table has T*K*(K-1)/2 rows (1.2 M at K=500, T=10), where per-row
        # csv.writer calls took 4 s.
        iu, ju = np.triu_indices(self.n_tasks, k=1)
        names = [_csv_field(n) for n in self.task_names]
        pairs = [f"{names[i]},{names[j]}," for i, j in zip(iu.tolist(), ju.tolist())]
        parts = ["target,task_i,task_j,interaction\n"]
        for t, target in enumerate(self.target_names):
            head = _csv_field(target) + ","
            # tolist() gives Python floats, whose repr is the exact shortest form (nan/inf too)
            vals = self.interactions[t, iu, ju].tolist()
            parts.append("".join(f"{head}{p}{v!r}\n" for p, v in zip(pairs, vals)))
        return "".join(parts).encode("utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AttributionReport":
        """Read a report written by :meth:`save` (``directory`` may also be its ``report.json``).

        Raises:
            FileNotFoundError: the directory, ``report.json`` or an array file it lists is missing.
            ValueError: a file is corrupt, has the wrong format, or does not match its checksum;
                the message names the file.
        """
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

    # -- rendering -------------------------------------------------------------------------------

    def to_html(self) -> str:
        """The self-contained HTML page (inline SVG heatmaps, tables; no scripts, no network)."""
        from .report_html import render_html

        return render_html(self)

    def to_text(self, max_rows: int | None = 10, *, method: str | None = None, targets: Sequence | None = None) -> str:
        """A plain-text summary for a terminal: ranked tables per target, pairs, subsets, groups.

        Args:
            max_rows: tasks shown per target (None: all). The omitted middle of the ranking is
                summarized in one line; the most helpful tasks come first, the most harmful last.
            method: the method to rank by (default :attr:`default_method`); all methods are shown.
            targets: target names or indices to show (default: all, default target first).
        """
        method = self._method(method)
        if max_rows is not None and (isinstance(max_rows, bool) or int(max_rows) < 1):
            raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
        if targets is None:
            d = self.target_index(None)
            cols = [d] + [t for t in range(self.n_targets) if t != d]
        else:
            cols = [self.target_index(t) for t in targets]
        s = _terminal_safe
        methods = [method] + [m for m in self.methods if m != method]
        lines = [
            f"lightning-ksm task attribution: {self.n_tasks} source tasks, {self.n_targets} targets, "
            f"ranked by '{method}'",
            "score = predicted increase of the target loss when the task is removed (> 0: the task helps)",
        ]
        fq = self._fit_line()
        if fq:
            lines.append(fq)
        for t in cols:
            target = self.target_names[t]
            lines += ["", f"== target '{s(target)}' =="]
            rows = self.ranked(t, method)
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
                k = self._task_pos[task]
                vals = "".join(f"{_fmt(self.scores[m][k, t], '+.4g'):>{col_w}}" for m in methods)
                lines.append(f"  {rank:>4}  {s(task):<{name_w}}{vals}")
            if self.interactions is not None:
                for kind in ("synergy", "antagonism"):
                    pairs = self.top_pairs(3, t, kind)
                    if pairs:
                        txt = ", ".join(f"{s(a)} + {s(b)} ({v:+.3g})" for a, b, v in pairs)
                        lines.append(f"  strongest {kind}: {txt}")
        if self.best_subsets:
            lines += ["", "== best subsets (lowest predicted target loss) =="]
            for e in self.best_subsets:
                how = "" if "exact" not in e else (", exhaustive search" if e["exact"] else ", heuristic search")
                extra = ""
                if "full_set_loss" in e:
                    extra = f" vs all tasks {_fmt(e['full_set_loss'])}"
                lines.append(
                    f"  target '{s(str(e['target']))}', {len(e['tasks'])} {'task' if len(e['tasks']) == 1 else 'tasks'}: predicted loss "
                    f"{_fmt(e.get('predicted_loss'))}{extra}{how}"
                )
                lines.append(f"    {{{', '.join(s(x) for x in e['tasks'])}}}")
        if self.groups:
            lines += ["", "== recommended co-training groups =="]
            for g, e in enumerate(self.groups, 1):
                pl = e.get("predicted_loss")
                if isinstance(pl, dict):
                    pl_txt = ", ".join(f"{s(k)}: {_fmt(v)}" for k, v in pl.items())
                else:
                    pl_txt = _fmt(pl)
                lines.append(f"  {g}. {{{', '.join(s(x) for x in e['tasks'])}}}  predicted loss {pl_txt}")
        return "\n".join(lines) + "\n"

    def _fit_line(self) -> str:
        fq = self.fit_quality
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

    def summary_metrics(self, prefix: str = "ksm") -> dict:
        """A flat ``{name: float}`` dict for ``logger.log_metrics``.

        Keys: ``<prefix>/score/<target>/<task>`` (default method),
        ``<prefix>/fit/<key>`` (numeric fit-quality entries),
        ``<prefix>/best_subset/<target>/size_<n>/predicted_loss``, ``<prefix>/time/<stage>``.
        Names are reduced to ``[A-Za-z0-9_.-]`` (other characters become ``_``; collisions get an
        index suffix) so that every logger accepts them. Non-finite values are left out because
        several loggers reject them.
        """
        out: dict = {}

        def put(key: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                return
            if math.isfinite(float(value)):
                out[key] = float(value)

        tkeys = _metric_keys(list(self.task_names))
        gkeys = _metric_keys(list(self.target_names))
        sc = self.scores[self.default_method]
        for t, gk in enumerate(gkeys):
            for k, tk in enumerate(tkeys):
                put(f"{prefix}/score/{gk}/{tk}", sc[k, t])
        for key, value in self.fit_quality.items():
            put(f"{prefix}/fit/{_metric_keys([key])[0]}", value)
        for e in self.best_subsets:
            gk = gkeys[self._target_pos[e["target"]]]
            put(f"{prefix}/best_subset/{gk}/size_{len(e['tasks'])}/predicted_loss", e.get("predicted_loss"))
        for stage, seconds in self.timings.items():
            put(f"{prefix}/time/{_metric_keys([stage])[0]}", seconds)
        return out


def _figures(report: AttributionReport, *, required: bool) -> dict:
    """PNG heatmaps as bytes, drawn with matplotlib's object API (no pyplot, no global backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if required:
            raise ImportError("figures=True needs matplotlib: pip install 'lightning-ksm[plot]'") from None
        return {}

    def heat(values: np.ndarray, rows: list, cols: list, cmap: str, title: str, label: str) -> bytes:
        finite = np.abs(values[np.isfinite(values)])
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        h = min(2.0 + 0.25 * len(rows), 40.0)
        w = min(3.0 + 0.6 * len(cols) + 0.08 * max(len(r) for r in rows), 40.0)
        fig = Figure(figsize=(w, h))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        if len(rows) <= 80:
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
        if len(cols) <= 80:
            ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=45, ha="right")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    out = {}
    names = list(report.task_names)
    out["scores.png"] = heat(
        report.scores[report.default_method], names, list(report.target_names), "RdBu",
        f"attribution scores ({report.default_method})", "score (> 0: task helps)",
    )
    if report.interactions is not None:
        t = report.target_index(None)
        mat = report.interactions[t].copy()
        np.fill_diagonal(mat, np.nan)
        out["interactions.png"] = heat(
            mat, names, names, "RdBu_r", f"pairwise interactions, target {report.target_names[t]!r}",
            "interaction (< 0 synergy, > 0 antagonism)",
        )
    return out
