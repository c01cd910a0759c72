"""Input checks of GradEx's features, subsets and scalars; all of them run before any solve."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._validation import check_training_subsets
from ..features import HarvestedFeatures
from .losses import MODE_TO_LOSS

__all__ = ["check_scalar", "check_source_subsets", "check_split", "check_target", "linear_regime_notes",
           "describe_divergence", "diverged_run_notes", "task_names", "REGIME_FACTOR"]

# How far the linearized all-tasks run may be from the watched one before the report says so. Seen:
# 0.86-1.44 on GPT-2 and 1.0-2.5 on the demo, where F^ tracks real retraining (Spearman 0.95+);
# 0.0015, the wrong direction, and draws 25x apart on ResNet-18 (benchmarks/results/
# resnet18_planted.json), where it does not. A sanity check, not a validated threshold.
REGIME_FACTOR = 3.0
# A target that both runs moved by less than this fraction of its W0 loss is not checked: the sign of
# a change that small is noise (the demo's neutral target 'pair-b': -0.0034 and +0.0004 of 0.7).
REGIME_MIN_CHANGE = 0.01


def task_names(feats: HarvestedFeatures) -> list:
    """The split's task names; ``task0``, ``task1``, ... when it has none."""
    names = [str(t) for t in feats.task_names]
    if not names and len(feats.task_ids):
        names = [f"task{t}" for t in range(int(np.max(feats.task_ids)) + 1)]
    return names


def _first_bad_row(arr: np.ndarray, bad) -> Optional[int]:
    """Index of the first row of ``arr`` where ``bad(chunk)`` flags any entry (chunked: no
    full-size temporaries for memory-mapped arrays)."""
    n = len(arr)
    step = max(1, (1 << 22) // max(1, int(np.prod(arr.shape[1:], dtype=np.int64))))
    for start in range(0, n, step):
        chunk = np.asarray(arr[start : start + step])
        flags = bad(chunk).reshape(len(chunk), -1).any(axis=1)
        if flags.any():
            return start + int(np.flatnonzero(flags)[0])
    return None


def check_split(feats, split: str, loss: str) -> None:
    """Raise unless ``feats`` is a non-empty, finite split whose labels suit ``loss``."""
    if not isinstance(feats, HarvestedFeatures):
        raise TypeError(f"{split} must be a HarvestedFeatures, got {type(feats).__name__}")
    if feats.n_samples == 0:
        raise ValueError(f"the {split} split has no samples")
    tid = np.asarray(feats.task_ids)
    if not np.issubdtype(tid.dtype, np.integer):
        if not np.issubdtype(tid.dtype, np.floating) or not np.all(tid == np.round(tid)):
            raise ValueError(f"{split}.task_ids must be integers, got dtype {tid.dtype}")
    names = task_names(feats)
    bad = np.flatnonzero((tid < 0) | (tid >= len(names)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{split}.task_ids[{i}] = {tid[i]} is not an index into {split}.task_names "
            f"(which has {len(names)} names)"
        )
    for name in ("outputs", "jacobians", "labels"):
        arr = getattr(feats, name)
        if name == "labels" and loss == "cross_entropy":
            continue  # checked as integers below
        try:
            i = _first_bad_row(arr, lambda c: ~np.isfinite(c))
        except TypeError:
            raise TypeError(f"{split}.{name} must be numeric, got dtype {np.asarray(arr[:1]).dtype}")
        if i is not None:
            raise ValueError(f"{split}.{name} has a NaN or inf value at sample index {i}")

    C = 1 if feats.outputs.ndim == 1 else feats.outputs.shape[1]
    labels = np.asarray(feats.labels)
    if loss == "cross_entropy":
        if feats.outputs.ndim != 2 or C < 2:
            raise ValueError(
                f"loss='cross_entropy' needs {split}.outputs of shape (n, C) with C >= 2 logits, "
                f"got {feats.outputs.shape}; use loss='logistic' for a scalar output"
            )
        if labels.ndim != 1:
            raise ValueError(
                f"loss='cross_entropy' needs {split}.labels of shape (n,) (class indices), "
                f"got {labels.shape}"
            )
        if labels.dtype.kind == "f":  # float labels are fine when they hold whole numbers
            ok = np.isfinite(labels) & (labels == np.round(labels))
        elif labels.dtype.kind in "iub":
            ok = np.ones(len(labels), dtype=bool)
        else:
            raise TypeError(f"{split}.labels must be integer class indices, got dtype {labels.dtype}")
        ok &= (labels >= 0) & (labels < C)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"{split}.labels[{i}] = {labels[i]} is not a class index in [0, {C}) "
                f"(the outputs have C = {C} logits)"
            )
    elif loss == "logistic":
        if C != 1:
            raise ValueError(
                f"loss='logistic' needs a scalar output per sample, but {split}.outputs has shape "
                f"{feats.outputs.shape}; use loss='cross_entropy' for logits"
            )
        flat = labels.reshape(len(labels), -1)
        if flat.shape[1] != 1:
            raise ValueError(f"loss='logistic' needs {split}.labels of shape (n,), got {labels.shape}")
        ok = (flat[:, 0] == 0) | (flat[:, 0] == 1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"loss='logistic' needs {split}.labels in {{0, 1}}, but {split}.labels[{i}] = {flat[i, 0]}"
            )
    else:  # squared
        want = (len(labels),) if feats.outputs.ndim == 1 else tuple(feats.outputs.shape)
        if labels.shape != want and not (feats.outputs.ndim == 1 and labels.shape == (len(labels), 1)):
            raise ValueError(
                f"loss='squared' needs {split}.labels shaped like the outputs {want}, got {labels.shape}"
            )


def check_target(source: HarvestedFeatures, target, loss: str, metric) -> None:
    """Raise unless ``target`` is a valid split that matches ``source`` (projection, outputs, mode)."""
    if not isinstance(target, HarvestedFeatures):
        raise TypeError(f"target must be a HarvestedFeatures, got {type(target).__name__}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable metric(outputs, labels) -> float, got {metric!r}")
    if source.proj_dim != target.proj_dim:
        raise ValueError(
            f"source and target have different projection dims k ({source.proj_dim} vs "
            f"{target.proj_dim}); harvest both with the same projector"
        )
    if source.outputs.shape[1:] != target.outputs.shape[1:]:
        raise ValueError(
            f"source outputs have per-sample shape {source.outputs.shape[1:]} but target outputs "
            f"have {target.outputs.shape[1:]}; both splits need the same output mode"
        )
    if (
        source.mode != target.mode
        and source.mode in MODE_TO_LOSS
        and target.mode in MODE_TO_LOSS
        and MODE_TO_LOSS[source.mode] != MODE_TO_LOSS[target.mode]
    ):
        raise ValueError(
            f"source mode {source.mode!r} and target mode {target.mode!r} imply different losses; "
            "harvest both splits in the same output mode"
        )
    check_split(target, "target", loss)


def check_source_subsets(source: HarvestedFeatures, subsets, loss: str) -> tuple[np.ndarray, list]:
    """Validate the source split and the subsets over its tasks; returns the (m, K) bool subsets
    and the K task names."""
    check_split(source, "source", loss)
    names = task_names(source)
    S = check_training_subsets(
        subsets,
        n_tasks=len(names),
        columns_of=f"the source split has K = {len(names)} tasks ({names[:5]}{'...' if len(names) > 5 else ''})",
    )
    counts = np.bincount(np.asarray(source.task_ids).astype(np.int64), minlength=len(names))
    missing = np.flatnonzero((counts == 0) & S.any(axis=0))
    if len(missing):
        t = int(missing[0])
        row = int(np.flatnonzero(S[:, t])[0])
        raise ValueError(
            f"source task {names[t]!r} (column {t}) has no samples in the source split, but "
            f"subset row {row} selects it; harvest samples for it or drop the column"
        )
    return S, names


def check_scalar(name: str, value, *, positive=True, integer=False) -> None:
    """Raise unless ``value`` is a finite number > 0 (``integer``: a positive integer)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def linear_regime_notes(all_tasks_change: Optional[dict], columns=("all",)) -> list:
    """At most one report note naming the target ``columns`` whose linearized all-tasks run (GradEx
    on every task) does not follow the watched run: its change of the target loss from W0 has the
    other sign, or is more than ``REGIME_FACTOR`` times larger or smaller, in any projection draw.
    Targets that both runs barely moved (less than ``REGIME_MIN_CHANGE`` of their W0 loss) are not
    checked. ``all_tasks_change``: the simulate estimator's ``{column: {"w0", "estimated",
    "observed"}}``, or a list of those per projection draw."""
    off = []
    for name in columns:
        entries = (all_tasks_change or {}).get(name)
        if entries is None:
            continue
        entries = entries if isinstance(entries, list) else [entries]
        obs = entries[0]["observed"]
        moved = max(abs(obs), *(abs(e["estimated"]) for e in entries))
        if moved == 0 or moved < REGIME_MIN_CHANGE * abs(entries[0]["w0"]):
            continue
        ratios = [abs(e["estimated"] / obs) if obs else math.inf for e in entries]
        if any(e["estimated"] * obs < 0 or not (1 / REGIME_FACTOR <= r <= REGIME_FACTOR)
               for e, r in zip(entries, ratios)):
            est = ", ".join(f"{e['estimated']:+.3g}" for e in entries)
            off.append(f"{name!r} by {est} where the watched run changed it by {obs:+.3g}")
    if not off:
        return []
    return [f"GradEx's linearized run on all tasks does not follow the watched run: it changes target "
            f"{'; '.join(off)} (per projection draw). The estimated losses are not what training gives, "
            f"and how well they rank subsets is not known from this run; check the subsets and tasks you "
            f"act on by retraining (docs/gradex.md, 'When the linearization does not hold')"]


def describe_divergence(diverged: dict) -> str:
    """What a run record's ``diverged`` entry says, in words (callbacks/run_record.py writes it)."""
    parts = []
    first = diverged.get("first_nonfinite_loss")
    if first:
        parts.append(f"the training loss was first NaN or inf at epoch {first.get('epoch')}, "
                     f"batch {first.get('batch')}")
    params = list(diverged.get("nonfinite_params") or [])
    if params:
        more = f" and {len(params) - 5} more" if len(params) > 5 else ""
        parts.append(f"the trained weights hold NaN or inf in {', '.join(map(repr, params[:5]))}{more}")
    losses = list(diverged.get("nonfinite_final_losses") or [])
    if losses:
        parts.append(f"the final target loss is NaN or inf for {', '.join(map(repr, losses))}")
    return "; ".join(parts) or "its final outcome is not finite"


def diverged_run_notes(run: Optional[dict]) -> list:
    """The report warning (at most one) for a watched run that diverged (``run["diverged"]``)."""
    diverged = (run or {}).get("diverged")
    if not diverged:
        return []
    return [f"THE WATCHED RUN DIVERGED: {describe_divergence(diverged)}. Its final losses and the effect "
            f"calibration are unavailable, and the linearized simulation of a run that diverged is not "
            f"supported: these estimates come from GradEx's proximal solve at W0 (estimator='proximal'), "
            f"not from the training that was run. Fix the training (e.g. a lower learning rate, gradient "
            f"clipping) and train again for an attribution of the run you use"]
