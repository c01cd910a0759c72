"""The store's index on disk: the manifest (store-level fields) and one record file per shard,
read through a cache (see the package docstring for the layout, atomicity and migration)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any

from ..fileio import atomic_write, exclusive_lock
from .errors import CorruptStoreError
from .manifest import FORMAT_VERSION, MANIFEST, RECORDS, check_manifest, check_record, natural_key, plain_name

__all__ = ["StoreIndex"]


def _read(path: str) -> tuple[bytes, tuple]:
    """A metadata file's bytes and the signature of what was read. Every manifest or record read
    goes through here (the tests count this work per shard written)."""
    with open(path, "rb") as f:
        return f.read(), _signature(os.fstat(f.fileno()))


def _signature(st: os.stat_result) -> tuple:
    # Files are only ever replaced atomically (a new inode), so a changed file changes this.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


class StoreIndex:
    """The manifest and shard records of the store in ``directory``, cached: the manifest is re-read
    when its file changes (a stat tells), the records are parsed once each and refreshed from a
    listing of the record directories (only new or replaced files are parsed), so per-shard calls
    (``record``, ``write_record``) cost the same however many shards the store holds."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._head = None  # (signature, bytes, checked store-level fields) of the manifest last read or written
        self._legacy: dict = {}  # a format-1/2 manifest's own shard list: {split: {key: record}}
        self._records: dict = {}  # {split: {key: (signature, record)}}: record files parsed so far

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def exists(self) -> bool:
        return os.path.exists(self.manifest_path)

    def header(self, *, fresh: bool = False) -> dict:
        """The manifest's store-level fields (checked; shared, do not modify). Without ``fresh`` an
        unchanged file costs one stat: ``write_shard`` asks for every shard."""
        path = self.manifest_path
        try:
            if not fresh and self._head is not None and _signature(os.stat(path)) == self._head[0]:
                return self._head[2]
            raw, sig = _read(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no feature store at {self.directory} (missing {MANIFEST}); harvest into it first"
            ) from None
        if self._head is not None and raw == self._head[1]:
            self._head = (sig,) + self._head[1:]
            return self._head[2]
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"corrupted manifest {path}: {exc}") from None
        data = check_manifest(data, path)
        legacy = {}
        if data["format_version"] < 3:  # read as it is; the first write migrates it (_migrate)
            legacy = {split: {s["key"]: s for s in v["shards"]} for split, v in data["splits"].items()}
        data.pop("splits", None)
        self._head, self._legacy = (sig, raw, data), legacy
        return data

    def manifest(self) -> dict:
        """The manifest as a dict, freshly read and validated (a malformed one: CorruptStoreError):
        the store-level fields, with every stored shard merged in as ``splits`` =
        ``{split: {"shards": [record, ...]}}`` (records in natural key order)."""
        header = self.header(fresh=True)
        data = copy.deepcopy(header)
        data["splits"] = {split: {"shards": [dict(shards[k]) for k in sorted(shards, key=natural_key)]}
                          for split, shards in sorted(self.view().items())}
        return data

    def locked(self):
        os.makedirs(self.directory, exist_ok=True)
        return exclusive_lock(os.path.join(self.directory, ".manifest.lock"))

    def write_manifest(self, data: dict) -> None:
        """Write the store-level fields of ``data`` (never ``splits``: shards live in their records);
        the caller holds the lock."""
        header = {k: v for k, v in data.items() if k != "splits"}
        text = _compact(header)
        atomic_write(self.manifest_path, lambda f: f.write(text), mode=None)
        self._head, self._legacy = (_signature(os.stat(self.manifest_path)), text, json.loads(text)), {}

    def locked_header(self) -> dict:
        """A private copy of the freshly read store-level fields, for a caller holding the lock that
        will rewrite them; a format-1/2 store is migrated first."""
        data = self.header(fresh=True)
        if data["format_version"] < FORMAT_VERSION:
            self.migrate(data)
            data = self.header(fresh=True)
        return copy.deepcopy(data)

    def migrate(self, data: dict) -> None:
        """Format 1/2 -> 3, under the lock: every shard the old manifest lists gets its record file,
        then the manifest is rewritten without the list. A crash in between leaves the old manifest
        and records that repeat its shards (read the same); the next write finishes the migration."""
        for split, shards in self._legacy.items():
            for key, shard in shards.items():
                if not os.path.exists(self.record_path(split, key)):
                    self.write_record(split, shard)
        header = dict(data, format_version=FORMAT_VERSION, migrated_from=data.get("migrated_from",
                                                                                   data["format_version"]))
        self.write_manifest(header)

    def check_output_shape(self, key: str, output_shape: list) -> None:
        """Every shard has the per-sample output shape recorded with the first one."""
        stored = self.header().get("output_shape")
        if stored is None:  # the store's first shard: record its shape (once, under the lock)
            with self.locked():
                data = self.locked_header()
                if data.get("output_shape") is None:
                    data["output_shape"] = output_shape
                    self.write_manifest(data)
                stored = data["output_shape"]
        if stored != output_shape:
            raise ValueError(
                f"shard {key!r}: outputs have per-sample shape {output_shape}, the store has "
                f"{stored} (mixing output modes or models?)"
            )

    # -- shard records ------------------------------------------------------------------------
    def record_path(self, split: str, key: str) -> str:
        return os.path.join(self.directory, split, RECORDS, f"{key}.json")

    def write_record(self, split: str, record: dict) -> None:
        path = self.record_path(split, record["key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = _compact(record)
        atomic_write(path, lambda f: f.write(text), mode=None)
        self._records.setdefault(split, {})[record["key"]] = (_signature(os.stat(path)), json.loads(text))

    def parse(self, split: str, key: str, path: str) -> dict | None:
        try:
            raw, sig = _read(path)
        except FileNotFoundError:
            return None
        record = check_record(raw, path, split, key)
        self._records.setdefault(split, {})[key] = (sig, record)
        return record

    def record(self, split: str, key: str) -> dict | None:
        """Shard ``key``'s record or None, in O(1): a stat, and a parse only if the file changed."""
        path = self.record_path(split, key)
        cached = self._records.get(split, {})
        try:
            sig = _signature(os.stat(path))
        except (FileNotFoundError, NotADirectoryError):
            cached.pop(key, None)
            return self._legacy.get(split, {}).get(key)
        hit = cached.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        record = self.parse(split, key, path)
        return record if record is not None else self._legacy.get(split, {}).get(key)

    def view(self, only: str | None = None) -> dict:
        """The stored shards, ``{split: {key: record}}`` (of split ``only``, if given): the record files
        merged over a format-1/2 manifest's list. Refreshing is a listing of the record directories
        and a stat per record; only new or replaced record files are parsed."""
        self.header()
        splits = {only: self._legacy.get(only, {})} if only is not None else dict(self._legacy)
        if only is None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                with os.scandir(self.directory) as entries:
                    for entry in entries:
                        if plain_name(entry.name) and entry.is_dir():
                            splits.setdefault(entry.name, {})
        view = {}
        for split, legacy in splits.items():
            merged = dict(legacy)
            merged.update(self.scan(split))
            if merged:
                view[split] = merged
        return view

    def scan(self, split: str) -> dict:
        """The record files of ``split`` ({key: record}), the cache refreshed from a listing."""
        old = self._records.get(split, {})
        new = {}
        directory = os.path.join(self.directory, split, RECORDS)
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(".json"):  # temporaries of writes in progress
                continue
            key = name[: -len(".json")]
            if not plain_name(key):
                raise CorruptStoreError(f"corrupted feature store: {entry.path} is not a shard record (its name is "
                                        "not a plain shard key); remove it")
            try:
                sig = _signature(entry.stat())
            except FileNotFoundError:
                continue
            hit = old.get(key)
            if hit is None or hit[0] != sig:
                try:
                    raw, sig = _read(entry.path)
                except FileNotFoundError:
                    continue
                hit = (sig, check_record(raw, entry.path, split, key))
            new[key] = hit
        self._records[split] = new
        return {k: v[1] for k, v in new.items()}
