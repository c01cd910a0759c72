"""The manifest and the shard records of a feature store: format constants, shard keys and split
names (plain names, never paths), and structural checks of a manifest or a shard record read from
disk (a hand-edited or damaged one fails with :class:`~lightning_ksm.store.errors.CorruptStoreError`
naming the file and the field, not with an ``AttributeError`` somewhere later)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from .errors import CorruptStoreError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST", "RECORDS", "ARRAYS", "shard_key",
           "check_split", "natural_key", "check_manifest", "check_record", "all_shards", "short", "plain_name"]

FORMAT_NAME = "lightning-ksm-features"
#: 2: shards carry SHA-256 checksums and the manifest records what a complete harvest is.
#: 3: each shard's record is its own file (``<split>/_records/<key>.json``); the manifest keeps only
#: the store-level fields, so registering a shard no longer rewrites a list of every shard.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
RECORDS = "_records"  # per split: one record file per shard (a name no shard key or split can take)
ARRAYS = ("outputs", "jacobians", "labels", "task_ids")
_SAFE = re.compile(r"^[A-Za-z0-9_.=+-]+$")


def plain_name(text: Any) -> bool:
    return isinstance(text, str) and bool(text) and bool(_SAFE.match(text)) and not text.startswith(("_", "."))


def shard_key(key: Any) -> str:
    """The string form of a shard key: ``(0, 12)`` -> ``"0-12"``; strings are kept as they are."""
    if isinstance(key, (tuple, list)):
        text = "-".join(str(int(k)) if isinstance(k, (int, np.integer)) else str(k) for k in key)
    elif isinstance(key, (int, np.integer)):
        text = str(int(key))
    elif isinstance(key, str):
        text = key
    else:
        raise TypeError(f"shard key must be a string, an int or a tuple of them, got {key!r}")
    if not plain_name(text):
        raise ValueError(
            f"shard key {key!r} must use only letters, digits and _.=+- (and not start with _ or .)"
        )
    return text


def check_split(split: str) -> str:
    if not plain_name(split):
        raise ValueError(f"split name {split!r} must use only letters, digits and _.=+-")
    return split


def natural_key(text: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def all_shards(data: dict) -> list:
    return [s for v in data["splits"].values() for s in v["shards"]]


def short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_manifest(data: Any, path: str) -> dict:
    """``data`` (a parsed manifest) checked field by field; raises CorruptStoreError naming the field.

    Formats 1 and 2 list every shard in the manifest (``splits``); format 3 keeps shards in record
    files (:func:`check_record`), and a ``splits`` field there is ignored.
    """

    def bad(what: str) -> CorruptStoreError:
        return CorruptStoreError(f"corrupted manifest {path}: {what}")

    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CorruptStoreError(f"{path} is not a lightning-ksm feature store manifest")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise CorruptStoreError(
            f"{path} has format_version {data.get('format_version')!r}; this version reads {list(READABLE_VERSIONS)}"
        )
    legacy = data["format_version"] < 3
    for field in ("projector", "k", "mode", "params", "dtype") + (("splits",) if legacy else ()):
        if field not in data:
            raise bad(f"missing field {field!r}")
    if not isinstance(data["k"], int) or isinstance(data["k"], bool) or data["k"] < 1:
        raise bad(f"field 'k' must be a positive integer, got {short(data['k'])}")
    if data.get("task_names") is not None and not isinstance(data["task_names"], list):
        raise bad("field 'task_names' must be a list or null")
    shape = data.get("output_shape")
    if shape is not None and not (isinstance(shape, list) and all(isinstance(x, int) for x in shape)):
        raise bad(f"field 'output_shape' must be a list of integers or null, got {short(shape)}")
    if legacy:
        if not isinstance(data["splits"], dict):
            raise bad(f"field 'splits' must be an object, got {short(data['splits'])}")
        for split, value in data["splits"].items():
            if not plain_name(split):
                raise bad(f"split name {split!r} is not a plain name (letters, digits, _.=+-)")
            if not isinstance(value, dict) or not isinstance(value.get("shards"), list):
                raise bad(f"split {split!r} must be an object with a 'shards' list")
            for shard in value["shards"]:
                _check_shard(shard, split, bad)
    plan = data.get("harvest")
    if plan is not None and not (isinstance(plan, dict) and isinstance(plan.get("expected"), dict)):
        raise bad("field 'harvest' must be an object with an 'expected' object")
    return data


def _check_shard(shard: Any, split: str, bad) -> dict:
    if not isinstance(shard, dict):
        raise bad(f"a shard record of split {split!r} is not an object: {short(shard)}")
    key = shard.get("key")
    if not plain_name(key):
        raise bad(f"shard key {key!r} of split {split!r} is not a plain name (a path such as '../x' "
                  "is never followed)")
    rows = shard.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise bad(f"shard {key!r} of split {split!r}: 'rows' must be a non-negative integer")
    if not isinstance(shard.get("task_values"), list):
        raise bad(f"shard {key!r} of split {split!r}: 'task_values' must be a list")
    if not isinstance(shard.get("has_index"), bool):
        raise bad(f"shard {key!r} of split {split!r}: 'has_index' must be true or false")
    sums = shard.get("sha256")
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise bad(f"shard {key!r} of split {split!r}: 'sha256' must map file names to hex digests")
    columns = shard.get("readout_columns")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise bad(f"shard {key!r} of split {split!r}: 'readout_columns' must be a list of names")
    return shard


def check_record(raw: bytes, path: str, split: str, key: str) -> dict:
    """The record file of shard ``key`` of ``split`` (its bytes ``raw``), parsed and checked; a torn,
    unparsable or malformed record raises CorruptStoreError naming ``path``."""

    def bad(what: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"corrupted shard record {path}: {what}. Delete it (and that shard's .npy files) to harvest the "
            "shard again"
        )

    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"unreadable ({type(exc).__name__}: {exc})") from None
    _check_shard(data, split, bad)
    if data["key"] != key:
        raise bad(f"it names shard {data['key']!r}, its file name says {key!r}")
    return data
