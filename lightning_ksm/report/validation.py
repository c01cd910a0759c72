"""Checks of an :class:`~lightning_ksm.report.AttributionReport`'s inputs, called by its ``__post_init__``.

Names must be unique non-empty strings, interactions symmetric in the two task axes, and every best
subset / group entry a dict whose tasks and targets the report knows. Each check raises
``TypeError``/``ValueError`` with a message that names the offending field and position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .files import _plain

if TYPE_CHECKING:  # pragma: no cover
    from .data import AttributionReport

__all__ = ["check_names", "check_symmetric", "check_entries"]


def check_names(names: Any, field_name: str) -> list:
    """``names`` as a list of unique, non-empty, UTF-8-encodable strings."""
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


def check_symmetric(report: "AttributionReport", inter: np.ndarray) -> None:
    """Raise unless ``inter`` (T, K, K) is symmetric in its task axes (NaN pairs count as equal)."""
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
            f"{report.target_names[t]!r}, tasks {report.task_names[i]!r} and {report.task_names[j]!r})"
        )

def check_entries(report: "AttributionReport", entries: Any, name: str, *, need_target: bool) -> list:
    """``entries`` (best subsets or groups) as a list of plain dicts, each checked against ``report``."""
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
            if task not in report._task_pos:
                raise ValueError(f"{name}[{i}]['tasks'] names the unknown task {task!r}; known: {report.task_names[:10]}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{name}[{i}]['tasks'] lists a task twice: {tasks}")
        if "size" in entry and entry["size"] != len(tasks):
            raise ValueError(f"{name}[{i}]['size']={entry['size']!r} but it lists {len(tasks)} tasks")
        if need_target:
            if entry.get("target") not in report._target_pos:
                raise ValueError(
                    f"{name}[{i}]['target']={entry.get('target')!r} is not one of target_names "
                    f"{report.target_names[:10]}"
                )
        pl = entry.get("predicted_loss")
        if isinstance(pl, dict):
            for target in pl:
                if target not in report._target_pos:
                    raise ValueError(f"{name}[{i}]['predicted_loss'] names the unknown target {target!r}")
        out.append(entry)
    return out
