"""The :class:`AttributionReport` dataclass: its fields, their validation, and the queries on them.

An :class:`AttributionReport` holds what the readouts produce (per-task scores for every target,
pairwise interactions, best subsets, co-training groups), how well the surrogate fitted, the data it
was fitted on, and everything needed to reproduce it (config, seeds, package versions, timings).
Checking its inputs, storing, printing, drawing and logging it live in the sibling modules
(``validation``, ``files``, ``text``, ``html``, ``figures``, ``metrics``); the methods here that
store, print and log only delegate.

Sign conventions (F is a loss, lower is better):

- ``scores[method][k, t]`` is the predicted increase of target ``t``'s loss when source task ``k`` is
  removed: **score > 0 means the task helps the target**, < 0 means it hurts.
- ``interactions[t, i, j] = g(1) - g(1-e_i) - g(1-e_j) + g(1-e_i-e_j)``: **< 0 is synergy**
  (removing both costs less than the two single removals added together: each task's benefit is
  larger when the other is present, the pair helps more together), **> 0 is antagonism /
  redundancy**.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Mapping, Sequence

import numpy as np

from .files import _json_bytes, _plain, load_report, save_report
from .html import render_html
from .metrics import summary_metrics as _summary_metrics
from .text import render_text
from .validation import check_entries, check_names, check_symmetric

__all__ = ["AttributionReport", "collect_versions"]

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
            ``n_train_subsets``, ``n_heldout_subsets``, ``surrogate``, ``support``.
        intervals: JSON-able dict of bootstrap intervals (empty: none): ``level``, ``n_bootstrap``,
            ``scores[method]["lo"/"hi"]`` as (K, T) lists, ``interactions`` with ``targets`` and
            ``lo``/``hi`` (T_i, K, K) for those targets. Best subsets and groups carry their own
            ``predicted_interval``.
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
    intervals: dict = field(default_factory=dict)
    subsets: Any = None
    losses: Any = None
    config: dict = field(default_factory=dict)
    seeds: Any = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    versions: dict | None = None
    created_at: str | None = None

    # -- validation ----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.task_names = check_names(self.task_names, "task_names")
        self.target_names = check_names(self.target_names, "target_names")
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
            check_symmetric(self, inter)
            self.interactions = inter

        self.best_subsets = check_entries(self, self.best_subsets, "best_subsets", need_target=True)
        self.groups = check_entries(self, self.groups, "groups", need_target=False)

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
        for name in ("fit_quality", "intervals", "config", "seeds", "timings"):
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
    def focus_targets(self) -> list:
        """The targets a user cares about, shown first: the validation groups that are not source
        tasks and not the pooled "all"; when there is none, :attr:`default_target`."""
        tasks = set(self.task_names)
        out = [t for t in self.target_names if t not in tasks and t != "all"]
        return out or [self.default_target]

    def score_interval(self, method: str | None = None) -> np.ndarray | None:
        """``(2, K, T)`` lower and upper bootstrap bounds of a method's scores, or None."""
        entry = (self.intervals.get("scores") or {}).get(self._method(method))
        if not entry:
            return None
        return np.array([entry["lo"], entry["hi"]], dtype=np.float64)

    def interaction_interval(self, target: str | int | None = None) -> np.ndarray | None:
        """``(2, K, K)`` bootstrap bounds of one target's interactions, or None when not computed."""
        entry = self.intervals.get("interactions") or {}
        name = self.target_names[self.target_index(target)]
        if name not in entry.get("targets", []):
            return None
        i = entry["targets"].index(name)
        return np.array([entry["lo"][i], entry["hi"][i]], dtype=np.float64)

    def within_noise(self, task: str | int, target: str | int | None = None, method: str | None = None):
        """True when the task's score interval contains 0 (its sign is not resolved), None without
        intervals."""
        iv = self.score_interval(method)
        if iv is None:
            return None
        lo, hi = iv[:, self.task_index(task), self.target_index(target)]
        return bool(lo <= 0 <= hi)

    @property
    def default_target(self) -> str:
        """``"all"`` when there is such a target, else the first target."""
        return "all" if "all" in self._target_pos else self.target_names[0]

    def target_index(self, target: str | int | None = None) -> int:
        """Column index of ``target`` (a name or an index); None means :attr:`default_target`."""
        if target is None:
            return self._target_pos[self.default_target]
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and str(int(target)) in self._target_pos:
            return self._target_pos[str(int(target))]  # an int task id names its target, never a position
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

    def warnings(self) -> list:
        """What qualifies every number of the report, said first wherever it is shown: that only part
        of the harvest was analysed, a watched run that diverged, and any GradEx estimate outside its
        regime (``fit_quality`` ``"warnings"``)."""
        fq = self.fit_quality
        out = [str((fq.get("notes") or ["PARTIAL HARVEST"])[0])] if fq.get("partial_harvest") else []
        return out + [str(w) for w in fq.get("warnings") or []]

    @property
    def withheld(self) -> dict | None:
        """Why and what magnitudes are withheld (``fit_quality["withheld"]``): set when no estimator
        followed the watched run; the scores are then an order, and no loss is given."""
        return self.fit_quality.get("withheld") or None

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
            "intervals": self.intervals,
            "config": self.config,
            "seeds": self.seeds,
            "timings": self.timings,
            "versions": self.versions,
            "created_at": self.created_at,
        }

    def save(self, directory: str | os.PathLike, *, figures: bool | str = "auto") -> dict:
        """Write every report file into ``directory`` (created if needed); see :mod:`lightning_ksm.report.files`.

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
        return save_report(self, directory, figures=figures)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AttributionReport":
        """Read a report written by :meth:`save` (``directory`` may also be its ``report.json``).

        Raises:
            FileNotFoundError: the directory, ``report.json`` or an array file it lists is missing.
            ValueError: a file is corrupt, has the wrong format, or does not match its checksum;
                the message names the file.
        """
        return load_report(cls, directory)

    # -- rendering -------------------------------------------------------------------------------

    def to_html(self) -> str:
        """The self-contained HTML page (inline SVG heatmaps, tables; no scripts, no network)."""
        return render_html(self)

    def to_text(self, max_rows: int | None = 10, *, method: str | None = None, targets: Sequence | None = None) -> str:
        """A plain-text summary for a terminal: ranked tables per target, pairs, subsets, groups.

        Args:
            max_rows: tasks shown per target (None: all). The omitted middle of the ranking is
                summarized in one line; the most helpful tasks come first, the most harmful last.
            method: the method to rank by (default :attr:`default_method`); all methods are shown.
            targets: target names or indices to show (default: all, default target first).
        """
        return render_text(self, max_rows, method=method, targets=targets)

    def summary_metrics(self, prefix: str = "ksm") -> dict:
        """A flat ``{name: float}`` dict for ``logger.log_metrics``.

        Keys: ``<prefix>/score/<target>/<task>`` (default method),
        ``<prefix>/fit/<key>`` (numeric fit-quality entries),
        ``<prefix>/best_subset/<target>/size_<n>/predicted_loss``, ``<prefix>/time/<stage>``.
        Names are reduced to ``[A-Za-z0-9_.-]`` (other characters become ``_``; collisions get an
        index suffix) so that every logger accepts them. Non-finite values are left out because
        several loggers reject them.
        """
        return _summary_metrics(self, prefix)
