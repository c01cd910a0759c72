"""The on-disk record of one retrained subset (``subset-00012.json``): its path, writing and reading."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from ..fileio import atomic_write_json

__all__ = ["FILE_FORMAT", "FILE_VERSION", "new_record", "read_record", "record_path", "write_record"]

FILE_FORMAT = "lightning-ksm-retrain-subset"
FILE_VERSION = 1


def record_path(directory: str, index: int) -> str:
    """Where subset row ``index`` is kept in ``directory``."""
    return os.path.join(directory, f"subset-{index:05d}.json")


def new_record(index: int, mask: np.ndarray, task_names, seed: int, losses: dict, seconds: float) -> dict:
    """The record of subset row ``index`` trained with ``seed``: its target ``losses`` and time."""
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "index": int(index),
        "subset": mask.astype(int).tolist(),
        "tasks": None if task_names is None else [task_names[t] for t in np.flatnonzero(mask)],
        "seed": int(seed),
        "losses": losses,
        "seconds": seconds,
    }


def write_record(directory: str, rec: dict) -> None:
    """Write ``rec`` atomically to its file in ``directory`` (compact JSON, one line)."""
    atomic_write_json(record_path(directory, rec["index"]), rec, indent=None)


def read_record(path: str, index: int, mask: np.ndarray, seed: int) -> Optional[dict]:
    """The stored record of subset ``index``, or None when there is none; raises when the file
    belongs to another subset or seed (a directory reused for another design)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable retraining record ({exc}); delete it to retrain that subset") from None
    if rec.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a lightning-ksm retraining record; use an empty directory")
    stored = np.asarray(rec.get("subset", []), dtype=bool)
    if stored.shape != mask.shape or not np.array_equal(stored, mask) or int(rec.get("seed", -1)) != seed:
        raise ValueError(
            f"{path} holds subset row {index} of another design (its subset or seed differs from "
            f"row {index} of this call); use a new directory for new subsets or seeds"
        )
    return rec
