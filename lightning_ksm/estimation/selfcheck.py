"""The self-check: which estimator follows the watched run, by a rule fixed in advance.

The watched run is one real retraining the analysis gets for free: the all-tasks subset, from W0 to
the trained weights, with its final target losses recorded (``run["final_losses"]``). Each candidate
estimator estimates that same subset (one subset per candidate and projection draw: cheap), and its
change of each target column's loss from W0 is compared with the run's. The rule (docs/gradex.md,
"Which estimator the report uses, and what the grade means"):

1. the candidates, in this fixed order: the configured estimator (the default: ``simulate`` with
   the exact target readout), ``simulate`` with the projected readout, ``proximal``;
2. a candidate **follows** the run when, on every target column and projection draw that moved
   (by at least ``REGIME_MIN_CHANGE`` of its W0 loss), its change has the run's sign and is within
   ``REGIME_FACTOR`` (3x) of it, or is off by at most ``SMALL_ERROR`` (a quarter) of the run's
   largest change of any column; it **gets the direction** when only the signs agree (or the error
   is that small);
3. the report uses the first candidate that follows (grade ``"follows"``); else the first that gets
   the direction (``"direction only"``); else ``proximal`` (``"does not follow"``). Below
   ``"follows"`` the analysis withholds every magnitude in loss units and shows the order only.

With an explicit ``estimator`` the self-check grades that estimator only and never switches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np
import torch

from ..config import AnalysisConfig
from ..features import HarvestedFeatures
from .checks import REGIME_FACTOR, REGIME_MIN_CHANGE
from .estimate import _Target
from .losses import default_loss
from .select import estimate_subsets, resolve_estimator

__all__ = ["GRADES", "candidates", "grade_changes", "self_check", "self_check_notes"]

GRADES = ("follows", "direction only", "does not follow")
# A column's error counts as evidence only above this fraction of the run's largest change of any
# column: on the quickstart's planted run a neutral column moved by +0.017 (estimate -0.017) where the
# target moved by -0.23 (estimate -0.22); that sign is noise, not a failure (docs/gradex.md).
SMALL_ERROR = 0.25


def candidates(config: AnalysisConfig, run: Optional[Mapping]) -> list:
    """``[(name, config), ...]`` in the rule's fixed order; only the configured estimator when
    ``config.estimator`` is explicit (or without a run record, where nothing can be checked)."""
    kind = resolve_estimator(config, run)
    readout = "exact" if kind == "simulate" and config.target_readout == "exact" else "projected"
    first = (kind if kind == "proximal" or readout == "exact" else "simulate-projected",
             dataclasses.replace(config, estimator=kind))
    if config.estimator != "auto" or kind != "simulate":
        return [first]
    out = [first]
    if readout == "exact":
        out.append(("simulate-projected", dataclasses.replace(config, estimator="simulate", target_readout="projected")))
    out.append(("proximal", dataclasses.replace(config, estimator="proximal")))
    return out


def _observed(run: Mapping) -> dict:
    observed = dict(run.get("final_losses") or {})
    if "all" not in observed and run.get("final_loss") is not None:
        observed["all"] = run["final_loss"]
    return {k: float(v) for k, v in observed.items() if v is not None and math.isfinite(float(v))}


def _w0_losses(source: HarvestedFeatures, target: HarvestedFeatures, config: AnalysisConfig) -> dict:
    """Each target column's loss at W0 (the harvested outputs, no weight change)."""
    loss = config.loss or default_loss(source.mode)
    C = 1 if np.ndim(target.outputs) == 1 else int(np.shape(target.outputs)[1])
    tgt = _Target(target, loss, C, "cpu", torch.float64)
    lo = tgt.evaluate(torch.zeros(tgt.Jf.shape[1], 1, dtype=torch.float64), False, None)[0][0]
    return dict(zip(tgt.names, map(float, lo)))


def _all_tasks_changes(source, target, config, run, base, observed) -> dict:
    """``{column: [{"w0", "estimated", "observed"} per projection draw]}`` of one candidate."""
    draws = int(getattr(source, "projection_draws", 1) or 1)
    parts = [(source.draw(i), target.draw(i)) for i in range(draws)] if draws > 1 else [(source, target)]
    full = np.ones((1, len(source.task_names)), dtype=bool)
    raw = dataclasses.replace(config, calibrate="none")  # the estimate itself, before any calibration
    out = {}
    for src, tgt in parts:
        result = estimate_subsets(src, tgt, full, raw, run=run)
        for j, name in enumerate(result.target_names):
            if name in observed:
                out.setdefault(name, []).append({"w0": base[name], "estimated": float(result.losses[0, j]) - base[name],
                                                 "observed": observed[name] - base[name]})
    return out


def grade_changes(changes: dict) -> tuple:
    """``(grade, checked columns, worst ratio)`` of one candidate's ``{column: [entries]}``: "follows"
    (every moved column and draw: the run's sign, within REGIME_FACTOR), "direction only" (the
    signs agree), "does not follow"; ``"not checked"`` when no column moved enough to check."""
    moves = [abs(d[0]["observed"]) for d in changes.values()]
    tol = SMALL_ERROR * max(moves, default=0.0)  # an error this small next to the run's largest change is no evidence
    checked, ratios, small = [], [], []
    for name, entries in changes.items():
        obs = entries[0]["observed"]
        moved = max(abs(obs), *(abs(e["estimated"]) for e in entries))
        if moved == 0 or moved < REGIME_MIN_CHANGE * abs(entries[0]["w0"]):
            continue  # neither run moved it: nothing to compare
        checked.append(name)
        for e in entries:
            ratio = e["estimated"] / obs if obs else math.inf
            ratios.append(ratio)
            small.append(abs(e["estimated"] - obs) <= tol)
    if not checked:
        return "not checked", checked, None
    signs = all(r > 0 or ok for r, ok in zip(ratios, small))
    within = signs and all(1 / REGIME_FACTOR <= r <= REGIME_FACTOR or ok for r, ok in zip(ratios, small))
    worst = max(ratios, key=lambda r: abs(math.log(r)) if 0 < r < math.inf else math.inf)
    return ("follows" if within else "direction only" if signs else "does not follow"), checked, float(worst)


def self_check(source: HarvestedFeatures, target: HarvestedFeatures, config: AnalysisConfig,
               run: Optional[Mapping]) -> tuple:
    """``(config to use, record)`` by the rule of the module docstring, or ``(config, None)`` when there
    is nothing to check against (no run record with final target losses, or a diverged run).

    The record (``fit_quality["self_check"]``): ``chosen`` (candidate name), ``grade`` ("follows",
    "direction only", "does not follow", or "not checked" when the run moved no target enough),
    ``default`` (the configured estimator's name) and, per candidate, its ``grade``, the
    ``checked`` columns, the ``worst_ratio`` (estimated / observed change, the one farthest from 1)
    and its ``changes`` per column and draw."""
    if not run or run.get("diverged") or not run.get("optimizer") or not run.get("steps"):
        return config, None
    observed = _observed(run)
    if not observed:
        return config, None
    base = _w0_losses(source, target, config)
    record = {"candidates": {}, "rule": "the first of the candidates (in this order) that follows; else the first "
              "that gets the direction; else proximal", "factor": REGIME_FACTOR}
    chosen = None
    options = candidates(config, run)
    for name, cfg in options:
        changes = _all_tasks_changes(source, target, cfg, run, base, observed)
        grade, checked, worst = grade_changes(changes)
        record["candidates"][name] = {"grade": grade, "checked": checked, "worst_ratio": worst, "changes": changes}
        if grade in ("follows", "not checked"):  # first that follows: the later ones are not needed
            chosen = (name, cfg, grade)
            break
    if chosen is None:
        direction = [(n, c) for n, c in options if record["candidates"][n]["grade"] == "direction only"]
        name, cfg = direction[0] if direction else options[-1]
        chosen = (name, cfg, "direction only" if direction else "does not follow")
    record.update({"default": options[0][0], "chosen": chosen[0], "grade": chosen[2]})
    return chosen[1], record


def _changes_text(entries_by_column: dict, columns) -> str:
    return "; ".join(f"{c!r} {', '.join(format(e['estimated'], '+.3g') for e in entries_by_column[c])}"
                     for c in columns if c in entries_by_column)


def self_check_notes(record: Optional[dict]) -> tuple:
    """``(warnings, notes)`` of the report for a self-check record: a warning, said first, when no
    candidate follows the run (the magnitudes are then withheld); a note when the report uses another
    estimator than the configured one because that one did not follow."""
    if not record or record["grade"] == "not checked":
        return [], []
    cands = record["candidates"]
    columns = [c for c in cands[record["default"]]["checked"]]
    observed = "; ".join(f"{c!r} {cands[record['default']]['changes'][c][0]['observed']:+.3g}" for c in columns)
    tried = " / ".join(f"{n}: {_changes_text(v['changes'], columns)}" for n, v in cands.items())
    if record["grade"] == "follows":
        if record["chosen"] == record["default"]:
            return [], []
        return [], [f"self-check: the default estimator ({record['default']}) does not follow the watched run on the "
                    f"all-tasks subset (the watched run changed target {observed}; per projection draw, {tried}); "
                    f"the report's numbers come from {record['chosen']}, the first in the fixed order that follows "
                    f"it (same sign, within {record['factor']:g}x; docs/gradex.md, 'Which estimator the report uses')"]
    how = ("its changes have the run's sign but not its size" if record["grade"] == "direction only"
           else "no estimator even gets the direction of the change, so this order is unverified")
    return [f"NO ESTIMATOR FOLLOWS THE WATCHED RUN: on the all-tasks subset the watched run changed target {observed}; "
            f"the estimators' linearized runs changed it by {tried} (per projection draw). Magnitudes are withheld: no "
            f"score, predicted loss or interval in loss units is shown, only the order of the tasks and subsets by "
            f"{record['chosen']} ({how}). Check the tasks and subsets you act on by retraining (docs/gradex.md, "
            f"'Which estimator the report uses')"], []
