"""The :class:`FeatureStore` (layout, atomicity, resume and completeness: see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from ..features import OUTPUT_MODES, HarvestedFeatures
from ..fileio import WriteFailedError, atomic_save_npy, ensure_free_space, is_out_of_space
from ..task_ids import canonical_task_names, dedup_positions, normalize_task_id
from . import plan as _plan
from .merge import merged_jacobians, sha256_file as _sha256_file
from .errors import CorruptStoreError, IncompleteHarvestError, StoreError
from .index import StoreIndex
from .manifest import FORMAT_NAME, FORMAT_VERSION, all_shards, check_split, natural_key, shard_key, short

_DTYPES = ("float32", "float16")

__all__ = ["FeatureStore"]

# Old private names, kept for callers inside the package.
_check_split, _natural_key, _all_shards, _short = check_split, natural_key, all_shards, short


class _Kept:
    """What a failed shard write leaves, for its error message: counting the stored shards lists
    every record, so it is done only when the message is actually formatted."""

    def __init__(self, store: "FeatureStore") -> None:
        self.store = store

    def __str__(self) -> str:
        try:
            n = str(sum(len(v) for v in self.store._index.view().values()))
        except (OSError, ValueError):
            n = "earlier"
        return f"the {n} shards already in the store are kept and a resumed harvest skips them; no partial file is left"


class FeatureStore:
    """An on-disk store of harvested features (see the package docstring for the layout).

    ``dtype`` is the on-disk dtype of the Jacobians (``"float32"`` or ``"float16"``); ``None`` means
    the existing store's dtype, or float32 for a new store. Outputs, labels are float32 (labels
    int64 in ``logits`` mode).

    Each object caches what it has read (:class:`~lightning_ksm.store.index.StoreIndex`), so
    per-shard calls (``write_shard``, ``has_shard``, ``shard_info``) cost the same however many
    shards the store holds.
    """

    def __init__(self, directory: str | os.PathLike, *, dtype: str | None = None) -> None:
        if dtype is not None and str(np.dtype(dtype)) not in _DTYPES:
            raise ValueError(f"FeatureStore dtype must be one of {_DTYPES}, got {dtype!r}")
        self.directory = os.fspath(directory)
        self._dtype = None if dtype is None else str(np.dtype(dtype))
        self._index = StoreIndex(self.directory)  # the manifest and the shard records, cached
        self.left_out: dict = {}  # {split: [damaged shard]}: what the last load(allow_partial=True) skipped
        if self.exists():
            existing = self._index.header()["dtype"]
            if self._dtype is not None and self._dtype != existing:
                raise ValueError(
                    f"feature store {self.directory} holds {existing} jacobians; it was opened with "
                    f"dtype={self._dtype!r} (drop the dtype argument or use a new directory)"
                )

    # -- manifest --------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return self._index.manifest_path

    def exists(self) -> bool:
        """Whether a manifest has been written (the store is initialized)."""
        return self._index.exists()

    def manifest(self) -> dict:
        """The manifest as a dict, freshly read and validated (a malformed one: CorruptStoreError):
        the store-level fields, with every stored shard merged in as ``splits`` =
        ``{split: {"shards": [record, ...]}}`` (records in natural key order)."""
        return self._index.manifest()

    @property
    def dtype(self) -> str:
        """On-disk dtype of the Jacobians."""
        return self._index.header()["dtype"] if self.exists() else (self._dtype or "float32")

    def initialize(
        self,
        *,
        projector_config: dict,
        mode: str,
        params: Sequence[tuple[str, Sequence[int]]] | dict,
        task_names: Sequence | None = None,
        meta: dict | None = None,
    ) -> dict:
        """Create the manifest, or check that an existing one describes the same harvest.

        A mismatch (a different projector, k, mode, parameter list or task names) raises a
        ``ValueError`` naming the field, so that incompatible features are never mixed. Returns
        :meth:`manifest`.
        """
        if mode not in OUTPUT_MODES:
            raise ValueError(f"mode must be one of {OUTPUT_MODES}, got {mode!r}")
        items = params.items() if isinstance(params, dict) else params
        param_list = [[str(n), [int(s) for s in shape]] for n, shape in items]
        names = None if task_names is None else [normalize_task_id(t) for t in task_names]
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"task_names contains duplicates: {names}")
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "projector": json.loads(json.dumps(projector_config)),
            "k": int(projector_config["k"]),
            "mode": mode,
            "task_names": names,
            "params": param_list,
            "d": int(sum(int(np.prod(s)) for _, s in param_list)),
            "dtype": self._dtype or "float32",
        }
        meta = json.loads(json.dumps(dict(meta or {})))
        with self._index.locked():
            if not self.exists():
                self._index.write_manifest(dict(header, output_shape=None, meta=meta, harvest=None))
                return self.manifest()
            data = self._index.locked_header()
            for field in ("k", "mode", "params", "projector", "dtype"):
                if field == "dtype" and self._dtype is None:
                    continue
                if data[field] != header[field]:
                    raise ValueError(
                        f"feature store {self.directory} was written with a different {field}: "
                        f"stored {_short(data[field])}, this harvest {_short(header[field])}; "
                        "use a new directory or the same settings"
                    )
            old_w0, new_w0 = (data.get("meta") or {}).get("w0_sha256"), meta.get("w0_sha256")
            if old_w0 and new_w0 and old_w0 != new_w0:
                raise StoreError(
                    f"feature store {self.directory} was harvested at another W0 (sha256 {old_w0[:12]}..., this "
                    f"harvest's W0 is {new_w0[:12]}...): features of two snapshots must not be mixed; harvest "
                    "into a new directory"
                )
            if names is not None and data.get("task_names") not in (None, names):
                raise ValueError(
                    f"feature store {self.directory} was written with task_names "
                    f"{data['task_names']}, this harvest uses {names}"
                )
            if names is not None and data.get("task_names") is None:
                seen = {v for shards in self._index.view().values() for s in shards.values() for v in s["task_values"]}
                unknown = [v for v in seen if v not in names]
                if unknown:
                    raise ValueError(f"stored shards contain task ids {unknown} not in task_names")
                data["task_names"] = names
                self._index.write_manifest(data)
        return self.manifest()

    # -- shards ----------------------------------------------------------------------------
    def splits(self) -> list[str]:
        """Names of the splits with at least one shard."""
        return sorted(self._index.view())

    def shard_keys(self, split: str) -> list[str]:
        """Keys of the shards stored for ``split``, in natural (numeric-aware) order."""
        split = _check_split(split)
        return sorted(self._index.view(split).get(split, {}), key=_natural_key)

    def has_shard(self, split: str, key: Any) -> bool:
        """Whether the shard ``key`` of ``split`` is complete (a resumed harvest can skip it)."""
        return self.shard_info(split, key) is not None

    def shard_info(self, split: str, key: Any) -> dict | None:
        """The record of shard ``key`` of ``split`` (rows, task values, ...), or None."""
        split, key = _check_split(split), shard_key(key)
        if not self.exists():
            return None
        self._index.header()  # a migrated or replaced manifest drops the old shard list
        record = self._index.record(split, key)
        return None if record is None else dict(record)

    def shard_index(self, split: str, key: Any) -> np.ndarray | None:
        """The per-sample global index stored with a shard (None if it has none)."""
        info = self.shard_info(split, key)
        if info is None or not info["has_index"]:
            return None
        return np.asarray(self._open(_check_split(split), info, "index"))

    def n_rows(self, split: str) -> int:
        """Rows stored for ``split`` before de-duplication."""
        split = _check_split(split)
        return sum(s["rows"] for s in self._index.view(split).get(split, {}).values())

    def write_shard(
        self,
        split: str,
        key: Any,
        *,
        outputs: np.ndarray,
        jacobians: np.ndarray,
        labels: np.ndarray,
        task_ids: np.ndarray,
        task_values: Sequence | None = None,
        sample_index: np.ndarray | None = None,
        readout: np.ndarray | None = None,
        readout_columns: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> dict:
        """Write one shard atomically and register it (its record file, written last); returns the record.

        ``task_ids`` are indices into ``task_values`` (the raw task ids of this shard); with
        ``task_values=None`` they are indices into the store's ``task_names``.
        ``sample_index`` is an optional per-sample global index used by ``load`` to de-duplicate.
        ``readout``: optional ``(n, C, T)`` exact target readout (:mod:`lightning_ksm.harvesting.readout`)
        of the T columns ``readout_columns``. The cost does not depend on the number of stored shards.
        """
        split = _check_split(split)
        key = shard_key(key)
        data = self._index.header()
        if data["format_version"] < FORMAT_VERSION:
            with self._index.locked():
                data = self._index.locked_header()
        outputs = np.asarray(outputs)
        jacobians = np.asarray(jacobians)
        labels = np.asarray(labels)
        task_ids = np.asarray(task_ids)
        n = len(task_ids)
        for name, arr in (("outputs", outputs), ("jacobians", jacobians), ("labels", labels)):
            if len(arr) != n:
                raise ValueError(f"shard {key!r}: {name} has {len(arr)} rows, task_ids has {n}")
        if jacobians.shape[-1] != data["k"]:
            raise ValueError(
                f"shard {key!r}: jacobians have k={jacobians.shape[-1]} but the store has k={data['k']}"
            )
        if task_values is None:
            if data["task_names"] is None:
                raise ValueError("write_shard needs task_values when the store has no task_names")
            task_values = data["task_names"]
        task_values = [normalize_task_id(v) for v in task_values]
        if n and (task_ids.min() < 0 or task_ids.max() >= len(task_values)):
            raise ValueError(f"shard {key!r}: task_ids must index task_values (0..{len(task_values) - 1})")
        if data["task_names"] is not None:
            unknown = [v for v in task_values if v not in data["task_names"]]
            if unknown:
                raise ValueError(
                    f"unknown task id(s) {unknown} in shard {key!r}; the store's task_names are "
                    f"{data['task_names']}"
                )
        output_shape = [int(x) for x in outputs.shape[1:]]
        if list(jacobians.shape[1:]) != output_shape + [data["k"]]:
            raise ValueError(
                f"shard {key!r}: jacobians of shape {jacobians.shape} do not match outputs of "
                f"shape {outputs.shape} (expected (n, *output_shape, k))"
            )
        if sample_index is not None:
            sample_index = np.asarray(sample_index).astype(np.int64)
            if sample_index.shape != (n,):
                raise ValueError(f"shard {key!r}: sample_index must have shape ({n},), got {sample_index.shape}")
        label_dtype = np.int64 if data["mode"] == "logits" else np.float32
        with np.errstate(over="ignore"):  # float16 overflow is reported below
            jac_disk = jacobians.astype(data["dtype"])
        arrays = {
            "outputs": outputs.astype(np.float32),
            "jacobians": jac_disk,
            "labels": labels.astype(label_dtype),
            "task_ids": task_ids.astype(np.int64),
        }
        if sample_index is not None:
            arrays["index"] = sample_index
        if readout is not None:
            readout = np.asarray(readout, dtype=np.float64)
            columns = [str(c) for c in (readout_columns or [])]
            if readout.ndim != 3 or len(readout) != n or readout.shape[2] != len(columns):
                raise ValueError(f"shard {key!r}: readout must have shape ({n}, C, {len(columns)}) for the columns "
                                 f"{columns}, got {readout.shape}")
            arrays["readout"] = readout
        if arrays["jacobians"].dtype == np.float16 and not np.isfinite(arrays["jacobians"]).all():
            if np.isfinite(jacobians).all():
                raise ValueError(
                    f"shard {key!r}: jacobians overflow float16 (|value| > 65504); use a float32 store"
                )
        if self._index.record(split, key) is not None and not overwrite:
            raise ValueError(f"shard {key!r} of split {split!r} already exists (pass overwrite=True)")
        self._index.check_output_shape(key, output_shape)
        split_dir = os.path.join(self.directory, split)
        os.makedirs(split_dir, exist_ok=True)
        prefix = os.path.join(split_dir, key)
        kept = _Kept(self)
        ensure_free_space(split_dir, sum(a.nbytes for a in arrays.values()), what=f"shard {key!r} of split {split!r}",
                          kept=kept)
        # Data files first (names are unique per key, so ranks never collide), the record last.
        sums = {}
        try:
            for name, arr in arrays.items():
                path = f"{prefix}.{name}.npy"
                atomic_save_npy(path, arr, mode=None)
                sums[name] = _sha256_file(path)
        except OSError as exc:
            if isinstance(exc, WriteFailedError):
                raise
            why = "the disk is full" if is_out_of_space(exc) else f"{type(exc).__name__}: {exc}"
            raise WriteFailedError(exc.errno, f"shard {key!r} of split {split!r} could not be written to "
                                              f"{split_dir} ({why}); {kept}") from exc
        record = {
            "key": key,
            "rows": n,
            "task_values": task_values,
            "has_index": sample_index is not None,
            "sha256": sums,
            **({"readout_columns": [str(c) for c in readout_columns]} if readout is not None else {}),
        }
        with self._index.locked():  # the lock only orders writers of this one key: the work is the same for any store size
            if not overwrite and os.path.exists(self._index.record_path(split, key)):
                raise ValueError(f"shard {key!r} of split {split!r} was written concurrently by another process")
            self._index.write_record(split, record)  # last: the shard now exists
        return dict(record)

    # -- loading ---------------------------------------------------------------------------
    def task_names(self) -> list:
        """The store's task names: fixed at initialization, or the sorted union of stored task ids."""
        data = self._index.header()
        if data["task_names"] is not None:
            return list(data["task_names"])
        return canonical_task_names(v for shards in self._index.view().values() for s in shards.values()
                                    for v in s["task_values"])

    # -- completeness (see :mod:`.plan`) ----------------------------------------------------
    def register_plan(self, world: int, expected: dict) -> None:
        """Record what a complete harvest is before writing shards (or check it against the record)."""
        with self._index.locked():
            self._index.write_manifest(_plan.register_plan(self._index.locked_header(), world, expected))

    def finish_rank(self, rank: int, filled: dict | None = None) -> dict:
        """Mark ``rank`` done; returns :meth:`completeness` (complete once the last rank is done)."""
        with self._index.locked():
            data = self._index.locked_header()
            data["splits"] = self.manifest()["splits"]  # the status check needs every stored shard
            data = _plan.finish_rank(data, rank, filled)
            self._index.write_manifest(data)  # the completion marker, if set, is the last write
        return _plan.status(data)

    def completeness(self) -> dict:
        """``{"recorded", "complete", "problems", "splits"}``: is the recorded harvest complete?"""
        return _plan.status(self.manifest())

    def check_complete(self, *, allow_partial: bool = False) -> dict:
        """Raise :class:`IncompleteHarvestError` unless the harvest is complete (or ``allow_partial``)."""
        st = self.completeness()
        if st["complete"] is False and not allow_partial:
            raise IncompleteHarvestError(
                f"the harvest in {self.directory} is incomplete or inconsistent: {_plan.describe_status(st)}. "
                "Resume the run that wrote it (trainer.fit(..., ckpt_path=...)) or harvest again; to analyse "
                "only what is stored, ask for it explicitly (allow_partial=True, "
                "`lightning-ksm analyze --allow-partial`)"
            )
        return st

    # -- reading -----------------------------------------------------------------------------
    def _path(self, split: str, shard: dict, name: str) -> str:
        return os.path.join(self.directory, split, f"{shard['key']}.{name}.npy")

    def _open(self, split: str, shard: dict, name: str, *, verify: bool = False) -> np.ndarray:
        path = self._path(split, shard, name)
        where = f"corrupted feature store: shard {shard['key']!r} of split {split!r}"
        want = (shard.get("sha256") or {}).get(name)
        try:
            damaged = verify and want is not None and _sha256_file(path) != want
            arr = None if damaged else np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CorruptStoreError(f"{where} is registered (its record exists) but {path} is missing") from None
        except (ValueError, EOFError, OSError) as exc:  # empty, short or not a .npy file
            raise CorruptStoreError(f"{where}: {path} is unreadable ({type(exc).__name__}: {exc})") from None
        if damaged:
            raise CorruptStoreError(f"{where}: {path} does not match its checksum (edited or damaged)")
        if arr.ndim == 0 or len(arr) != shard["rows"]:
            raise CorruptStoreError(f"{where}: {path} has {len(arr) if arr.ndim else 0} rows, its record says "
                                    f"{shard['rows']}")
        return arr

    def load(self, split: str = "source", *, dedup: bool = True, dtype: str | None = None,
             allow_partial: bool = False, verify: bool = True) -> HarvestedFeatures:
        """All shards of ``split`` as one :class:`HarvestedFeatures` with memory-mapped Jacobians.

        With per-sample indices, duplicates are dropped (first occurrence in shard-key order wins)
        and rows are ordered by index; without, rows follow shard-key order. ``dtype="float32"``
        returns in-memory float32 Jacobians (e.g. from a float16 store). An incomplete harvest
        raises :class:`IncompleteHarvestError` unless ``allow_partial``; ``verify`` checks every
        file against its SHA-256 (:class:`CorruptStoreError` on a mismatch; with ``allow_partial`` a
        damaged shard is left out instead, with a warning, and listed in ``self.left_out[split]``).
        """
        split = check_split(split)
        self.check_complete(allow_partial=allow_partial)
        data = self.manifest()
        if split not in data["splits"] or not data["splits"][split]["shards"]:
            raise StoreError(
                f"feature store {self.directory} has no shards for split {split!r}; "
                f"stored splits: {self.splits()}"
            )
        shards = sorted(data["splits"][split]["shards"], key=lambda s: natural_key(s["key"]))
        names = self.task_names()
        position = {v: i for i, v in enumerate(names)}
        parts, self.left_out[split] = [], []
        for shard in shards:
            try:
                parts.append(self._shard_arrays(split, shard, position, verify))
            except CorruptStoreError as exc:
                if not allow_partial:
                    raise CorruptStoreError(f"{exc}. To analyse the rest without this shard: allow_partial=True "
                                            "(`lightning-ksm analyze --allow-partial`)") from None
                left = dict(split=split, why=str(exc), **{k: shard[k] for k in ("key", "rows", "task_values")})
                self.left_out[split].append(left)
                warnings.warn(f"allow_partial: {_plan.describe_left_out(left)}", stacklevel=2)
        if not parts:
            raise CorruptStoreError(f"every shard of split {split!r} is damaged; nothing is left to analyse: harvest again")
        shards = [shard for shard, _ in parts]
        small = {n: [p[n] for _, p in parts] for n in ("outputs", "labels", "task_ids")}
        indices = [p["index"] for _, p in parts if p["index"] is not None]
        with_index = len(indices)
        if with_index not in (0, len(shards)):
            raise StoreError(
                f"split {split!r} mixes shards with and without sample indices; "
                "pass sample indices for every batch or for none"
            )
        cat = {n: np.concatenate(v) for n, v in small.items()}
        total = len(cat["task_ids"])
        if with_index:
            index = np.concatenate(indices)
            keep = dedup_positions(index) if dedup else np.argsort(index, kind="stable")
        else:
            keep = np.arange(total)
        jac = merged_jacobians(self, split, shards, keep, total, verify=verify)
        if dtype is not None:
            jac = np.asarray(jac, dtype=dtype)
        readout, columns = self._readout(split, shards, keep, False)  # checked with its shard
        return HarvestedFeatures(
            outputs=cat["outputs"][keep],
            jacobians=jac,
            labels=cat["labels"][keep],
            task_ids=cat["task_ids"][keep],
            task_names=names,
            mode=data["mode"],
            readout=readout,
            readout_columns=columns,
            preconditioned=bool((data.get("meta") or {}).get("preconditioned", False)),
            projection_draws=int((data.get("projector") or {}).get("draws", 1)),
        )

    def _shard_arrays(self, split: str, shard: dict, position: dict, verify: bool) -> tuple[dict, dict]:
        """A shard and its small arrays (task ids mapped to the store's names), every file checked."""
        if verify:
            for name in ("jacobians",) + (("readout",) if shard.get("readout_columns") is not None else ()):
                self._open(split, shard, name, verify=True)
        out = {n: np.asarray(self._open(split, shard, n, verify=verify)) for n in ("outputs", "labels", "task_ids")}
        local, values = out["task_ids"], shard["task_values"]
        where = f"corrupted feature store: shard {shard['key']!r} of split {split!r}"
        if len(local) and (local.min() < 0 or local.max() >= len(values)):
            raise CorruptStoreError(f"{where} has task ids outside its {len(values)} task values")
        unknown = [v for v in values if v not in position]
        if unknown:
            raise CorruptStoreError(f"{where} has task values {unknown} that are not in the store's task_names")
        table = np.array([position[v] for v in values], dtype=np.int64)
        out["task_ids"] = table[local] if len(local) else local.astype(np.int64)
        out["index"] = np.asarray(self._open(split, shard, "index", verify=verify)) if shard["has_index"] else None
        return shard, out

    def _readout(self, split: str, shards: list, keep: np.ndarray, verify: bool):
        """The exact target readout when every shard of the split has one with the same columns."""
        columns = [s.get("readout_columns") for s in shards]
        if not columns or columns[0] is None or any(c != columns[0] for c in columns):
            return None, []
        parts = [np.asarray(self._open(split, s, "readout", verify=verify)) for s in shards]
        return np.concatenate(parts)[keep], list(columns[0])

    def load_index(self, split: str = "source", *, dedup: bool = True) -> np.ndarray | None:
        """The global sample index of each row ``load(split)`` returns (None if none was stored)."""
        split = check_split(split)
        shards = sorted(self._index.view(split).get(split, {}).values(), key=lambda s: natural_key(s["key"]))
        if not shards or not all(s["has_index"] for s in shards):
            return None
        index = np.concatenate([np.asarray(self._open(split, s, "index")) for s in shards])
        keep = dedup_positions(index) if dedup else np.argsort(index, kind="stable")
        return index[keep]

    def cleanup(self) -> list[str]:
        """Remove merged-Jacobian caches and leftover temporary files; returns the removed paths.

        Call it when no other process is reading or writing the store.
        """
        removed = []
        for root, _, files in os.walk(self.directory):
            for name in files:
                if name.startswith("_merged-") or ".tmp-" in name:
                    path = os.path.join(root, name)
                    with contextlib.suppress(OSError):
                        os.remove(path)
                        removed.append(path)
        return removed
