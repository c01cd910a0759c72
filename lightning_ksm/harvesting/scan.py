"""The whole-data check at train start (reads the data, never runs the model): task ids, labels
and inputs of every sample of every loader, so that bad data fails before the first training
step instead of at the end of training, with the loader's name and the dataset index.

It also reads target loaders whose batches carry no task ids as one target group named after the
loader (:class:`GroupReader`)."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import torch

from ..task_ids import POOLED_TARGET, normalize_task_id
from .batches import BatchReader, loader_chunks, tolist
from .outputs import IGNORE_INDEX

__all__ = ["GroupReader", "with_group_readers", "scan_data", "check_label_range"]


class GroupReader(BatchReader):
    """Reads inputs and labels like ``base``; every sample's task id is ``group`` (a loader's name)."""

    def __init__(self, base: BatchReader, group: str):
        super().__init__(input_key=base.keys["inputs"], label_key=base.keys["labels"])
        self.group = group

    def read(self, batch: Any):
        inputs, labels = self._get(batch, "inputs"), self._get(batch, "labels")
        return inputs, labels, [self.group] * len(labels)


def _has_task_ids(loader, reader: BatchReader) -> bool:
    first = next(loader_chunks(loader, reader, batch_size=2), None)
    if first is None:
        return True  # empty: the probe says so
    batch = first[2]() if callable(first[2]) else first[2]
    try:
        reader._get(batch, "task_ids")
    except ValueError:
        return False
    return True


def with_group_readers(entries: Sequence[tuple], reader: BatchReader) -> list:
    """``entries`` = ``[(split, loader, description, group_name)]``: a target loader whose batches hold
    no task ids (and ``task_key`` was not set) is read with a :class:`GroupReader` named ``group_name``.
    Returns plan entries ``(split, loader, description, reader)``."""
    out = []
    for split, loader, description, group in entries:
        use = reader
        if split == "target" and reader.keys["task_ids"] is None and not _has_task_ids(loader, reader):
            if group == POOLED_TARGET:
                raise ValueError(
                    f"the {description} has no task ids, so its samples are one target group named after the "
                    f"loader, but {POOLED_TARGET!r} is the report's name for every target sample pooled; give "
                    "that loader another name (its key in the dict of loaders)")
            use = GroupReader(reader, group)
        out.append((split, loader, description, use))
    return out


def _non_finite(obj) -> int | None:
    """Position of the first sample with a NaN/inf in a (nested) floating tensor, or None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            bad = ~torch.isfinite(obj.reshape(len(obj), -1) if obj.ndim else obj.reshape(1, 1)).all(dim=1)
            hits = torch.nonzero(bad).flatten()
            return int(hits[0]) if len(hits) else None
        return None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        found = [p for p in (_non_finite(v) for v in obj) if p is not None]
        return min(found) if found else None
    return None


def scan_data(entries: Sequence[tuple], *, batch_size: int = 1024) -> dict:
    """Read every sample of the plan ``[(split, loader, description, reader)]`` once. The result's
    ``fingerprints`` give each loader's ``(samples, digest of its labels and task ids)``: what DDP
    ranks compare to find out that they read different data.

    Raises ``ValueError`` naming the loader and the dataset index for: an unreadable batch, a task
    id that is not an int or a string, an empty-string id, ids that differ only in type (``1`` and
    ``"1"``), a target task id ``"all"`` (the pooled target group's name), a non-finite input or label. Returns ``{"source_tasks": [...], "labels": {description:
    {"min", "max", "integral", "at_min", "at_max"}}}`` for :func:`check_label_range`.
    """
    seen: dict = {}  # str(id) -> (id, description, dataset index)
    source, labels, fingerprints = set(), {}, {}
    for loader_no, (split, loader, description, reader) in enumerate(entries):
        stats = {"min": math.inf, "max": -math.inf, "integral": True, "at_min": None, "at_max": None,
                 "no_token": None, "no_token_causal": None}  # token labels (batch, T) all -100
        digest, samples = hashlib.blake2b(digest_size=8), 0
        for key, index, batch in loader_chunks(loader, reader, loader_no=loader_no, batch_size=batch_size):
            where = lambda i: f"{description}, dataset index {int(index[i])}"  # noqa: E731
            try:
                batch = batch() if callable(batch) else batch
                inputs, y, tasks = reader.read(batch)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{description}, dataset indices {int(index[0])}..{int(index[-1])}: {exc}") from exc
            for i, raw in enumerate(tolist(tasks)):
                try:
                    tid = normalize_task_id(raw)
                except TypeError as exc:
                    raise ValueError(f"{where(i)}: {exc}") from None
                if tid == "":
                    raise ValueError(f"{where(i)}: an empty-string task id; give every sample a task name")
                if split == "target" and tid == POOLED_TARGET:
                    raise ValueError(f"{where(i)}: the task id {POOLED_TARGET!r} is the report's name for every target "
                                     "sample pooled; rename that task (in the training data too, if it is there)")
                first = seen.setdefault(str(tid), (tid, where(i)))
                if type(first[0]) is not type(tid):
                    raise ValueError(f"task ids {first[0]!r} ({first[1]}) and {tid!r} ({where(i)}) differ only in "
                                     "type; use one type for task ids (all ints or all strings)")
                if split == "source":
                    source.add(tid)
            samples += len(index)
            digest.update(repr(tolist(tasks)).encode())  # not the inputs: augmentation may differ per rank
            if isinstance(y, torch.Tensor):
                digest.update(y.detach().cpu().double().numpy().tobytes())
            bad = _non_finite(inputs)
            if bad is not None:
                raise ValueError(f"{where(bad)}: the input holds NaN or inf")
            if isinstance(y, torch.Tensor) and y.numel():
                flat = y.reshape(len(y), -1).double() if y.ndim else y.reshape(1, 1).double()
                bad = _non_finite(flat)
                if bad is not None:
                    raise ValueError(f"{where(bad)}: the label is NaN or inf")
                lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
                i_lo, i_hi = int(torch.argmin(lo)), int(torch.argmax(hi))
                if float(lo[i_lo]) < stats["min"]:
                    stats["min"], stats["at_min"] = float(lo[i_lo]), where(i_lo)
                if float(hi[i_hi]) > stats["max"]:
                    stats["max"], stats["at_max"] = float(hi[i_hi]), where(i_hi)
                stats["integral"] &= bool((flat == flat.round()).all())
                if y.ndim == 2 and y.shape[1] and not y.is_floating_point():
                    ignored = y == IGNORE_INDEX
                    for name, rows in (("no_token", ignored.all(1)), ("no_token_causal", ignored[:, 1:].all(1))):
                        hits = torch.nonzero(rows).flatten()
                        if stats[name] is None and len(hits):
                            stats[name] = where(int(hits[0]))
        labels[description] = stats
        fingerprints[description] = (samples, digest.hexdigest())
    return {"source_tasks": sorted(source, key=lambda v: (isinstance(v, str), v)), "labels": labels,
            "fingerprints": fingerprints}


def check_label_range(scan: dict, mode, n_classes: int | None, sequence_labels: str = "causal") -> None:
    """Class labels of every loader fit ``n_classes`` (margin/logits; the vocabulary for sequence, where
    -100 means no loss and every sample needs a supervised token) or are 0/1 (logistic)."""
    for description, st in scan["labels"].items():
        if st["at_min"] is None:
            continue
        if mode == "sequence" and n_classes is not None:
            empty = st["no_token_causal"] if sequence_labels == "causal" else st["no_token"]
            if empty is not None:
                raise ValueError(f"{empty}: no supervised token (every token label is {IGNORE_INDEX}"
                                 f"{' after the causal shift' if sequence_labels == 'causal' else ''}); "
                                 "output='sequence' takes each sample's mean loss over its supervised tokens")
            if not st["integral"]:
                raise ValueError(f"{description}: output='sequence' needs integer token labels (label_key)")
            if st["min"] < IGNORE_INDEX:
                raise ValueError(f"{st['at_min']}: token label {st['min']:g} is neither {IGNORE_INDEX} nor a token id")
            if st["max"] >= n_classes:
                raise ValueError(f"{st['at_max']}: token label {st['max']:g} is out of range for the model's "
                                 f"{n_classes} vocabulary entries")
        elif mode in ("margin", "logits") and n_classes is not None:
            if not st["integral"]:
                raise ValueError(f"{description}: labels must be class indices (integers) for output={mode!r}")
            if st["min"] < 0:
                raise ValueError(f"{st['at_min']}: label {st['min']:g} is out of range for {n_classes} classes")
            if st["max"] >= n_classes:
                raise ValueError(f"{st['at_max']}: label {st['max']:g} is out of range for {n_classes} classes")
        elif mode == "logistic" and (st["min"] < 0 or st["max"] > 1 or not st["integral"]):
            at = st["at_min"] if st["min"] < 0 else st["at_max"]
            raise ValueError(f"{at}: output='logistic' needs labels 0 or 1")
