"""The watched run's epochs as the ``simulate`` estimator reads them from the run record.

The callback records, per epoch, the optimizer steps the run took and the samples of each task it
drew (``run["per_epoch"]``, :mod:`lightning_ksm.callbacks.run_record`). A subset ``s`` is simulated
as the watched run without the tasks outside ``s``: in each epoch it gets the run's steps in
proportion to its share of the samples drawn, ``ceil(steps_e x drawn_s,e / drawn_e)`` (the run's own
effective batch size, batch x accumulation x world size; the all-tasks subset gets exactly the
run's steps). Where the run drew every sample in each epoch (the usual case) a subset's share is
its share of the data. Where it drew less in some epoch (``limit_train_batches``, an epoch cut
short), the shares are those of what was drawn and each task's samples are weighted by how often
the run drew them; tasks it never drew are left out of the analysis (a run that never trained on
a task says nothing about it; :func:`run_record_notes` says so first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["EpochDraws", "epoch_draws", "undrawn_tasks", "run_record_notes"]


@dataclass
class EpochDraws:
    """Per recorded epoch: ``steps`` (E,), the samples of each task that count as drawn ``drawn``
    (E, K; the data where the run drew all of it), their total ``total`` (E,, every task the run
    drew, also those not among the K), and ``partial``: some epoch drew less than the data."""

    steps: np.ndarray
    drawn: np.ndarray
    total: np.ndarray
    partial: bool

    def subset_draws(self, S: np.ndarray) -> np.ndarray:
        """(m, E): the samples of each subset's tasks drawn per epoch."""
        return np.asarray(S, dtype=np.int64) @ self.drawn.T

    def sample_rates(self, counts: np.ndarray) -> Optional[np.ndarray]:
        """(K,) how often the run drew each sample of a task (on average), or None when it drew all
        the data in every epoch (every sample equally often)."""
        if not self.partial:
            return None
        counts = np.asarray(counts, dtype=np.float64)
        return np.divide(self.drawn.sum(0), counts, out=np.zeros(len(counts)), where=counts > 0)


def _recorded(run: Optional[Mapping], names: list):
    """(steps (E,), drawn (E, K) or None, total (E,) or None) from ``run["per_epoch"]``; None
    when the record has no per-epoch steps (an older record, or a resume that lost them)."""
    per = (run or {}).get("per_epoch")
    if not per:
        return None
    steps = np.array([int(e.get("steps") or 0) for e in per], dtype=np.int64)
    if steps.sum() < 1:
        return None
    if any(not isinstance(e.get("drawn"), Mapping) for e in per):
        return steps, None, None
    drawn = np.array([[int(e["drawn"].get(n, 0)) for n in names] for e in per], dtype=np.int64)
    if drawn.sum() == 0:  # the recorded task ids name none of these tasks: not this data's draws
        return steps, None, None
    return steps, drawn, np.array([sum(int(v) for v in e["drawn"].values()) for e in per], dtype=np.int64)


def epoch_draws(run: Optional[Mapping], task_names: Sequence, counts: np.ndarray) -> Optional[EpochDraws]:
    """The recorded epochs for the source tasks ``task_names`` with ``counts`` samples each; None
    without per-epoch steps in the record."""
    names = [str(t) for t in task_names]
    counts = np.asarray(counts, dtype=np.int64)
    found = _recorded(run, names)
    if found is None:
        return None
    steps, drawn, total = found
    n_data = int((run or {}).get("n_train_samples") or counts.sum())
    partial = drawn is not None and bool(np.any(total < n_data))
    if not partial:  # every sample drawn once per epoch: a subset's share is its share of the data
        drawn = np.repeat(counts[None, :], len(steps), axis=0)
        total = np.full(len(steps), int(counts.sum()), dtype=np.int64)
    return EpochDraws(steps=steps, drawn=drawn, total=total, partial=partial)


def undrawn_tasks(run: Optional[Mapping], task_names: Sequence) -> list:
    """The tasks of ``task_names`` the watched run never drew a sample of (by its recorded draws)."""
    found = _recorded(run, [str(t) for t in task_names])
    if found is None or found[1] is None:
        return []
    return [t for t, n in zip(task_names, found[1].sum(0)) if n == 0]


def run_record_notes(run: Optional[Mapping], task_names: Sequence, counts: np.ndarray, calibrate: str,
                     left_out: Sequence = ()) -> tuple:
    """``(warnings, notes)`` about the run record that qualify the simulate estimator's report:
    tasks ``left_out`` because the run never drew them (a warning), epochs that drew only part of
    the data, and a resume from a mid-epoch checkpoint when the calibration uses the run's outcome."""
    run = run or {}
    warnings, notes = [], []
    limit = run.get("limit_train_batches")
    limit_text = f" (limit_train_batches={limit})" if limit not in (None, 1, 1.0) else ""
    if left_out:
        names = ", ".join(repr(str(t)) for t in left_out)
        warnings.append(
            f"The watched run never drew a sample of task(s) {names}{limit_text}: they are left out of this "
            f"report (no score, subset or group), since a run that never trained on a task says nothing "
            f"about it. To attribute them, train on all the data (docs/gradex.md, 'The steps of each subset')")
    draws = epoch_draws(run, task_names, counts)
    if draws is not None and draws.partial:
        n = int(run.get("n_train_samples") or np.sum(counts))
        lo, hi = int(draws.total.min()), int(draws.total.max())
        drew = f"{lo}" if lo == hi else f"{lo} to {hi}"
        share = ("each subset getting the share its tasks had of what was drawn" if run.get("epoch_based")
                 else "every subset all of them (a step-based run)")
        notes.append(
            f"The watched run drew {drew} of its {n} training samples per epoch{limit_text}: GradEx "
            f"simulated the {int(draws.steps.sum())} optimizer steps it made, {share}, and weighted each "
            f"task's samples by how often they were drawn")
    mid = [r for r in run.get("resumed") or [] if r.get("mid_epoch")]
    if mid and calibrate in ("effect", "loss"):
        where = "; ".join(f"epoch {r['epoch']}, step {r['step']}" for r in mid)
        notes.append(
            f"The watched run was resumed from a mid-epoch checkpoint ({where}): Lightning restarts that "
            f"epoch's data loader, so the rest of the run, and the final target losses that "
            f"calibrate={calibrate!r} fits the estimates to (and the regime check compares with), differ from "
            f"an uninterrupted run's, and so can this report's numbers; calibrate='none' makes them "
            f"independent of the run's outcome")
    return warnings, notes
