"""On-disk feature store for harvested per-sample features: shards per split, one record file per
shard, one manifest of store-level fields.

Layout of a store directory (format 3)::

    manifest.json                 format version, projector config, output mode, task names (or
                                  null), parameter names/shapes, jacobian dtype, per-sample output
                                  shape, meta, and the harvest plan / completion marker (:mod:`.plan`);
                                  no list of shards: it is rewritten only by those store-level changes
    <split>/_records/<key>.json   one small record per shard: rows, its task values, whether it has a
                                  sample index, the SHA-256 of each of its files, readout columns
    <split>/<key>.outputs.npy     one shard = four to six .npy files (index, readout only when given)
    <split>/<key>.jacobians.npy
    <split>/<key>.labels.npy
    <split>/<key>.task_ids.npy    indices into the shard's own ``task_values`` list (see below)
    <split>/<key>.index.npy       optional per-sample global index (for de-duplication)

Writes are atomic: every file is written to a temporary name and moved into place with
``os.replace``. A shard's record is written last, after its data files, so a shard exists exactly
when its record does: a record that is absent means the shard was never (completely) written; a torn
or malformed one raises :class:`CorruptStoreError` naming the file. Registering a shard touches only
its own record, so its cost does not depend on how many shards are stored. Reads merge the records
(each :class:`FeatureStore` caches them and, on a later read, lists the record directories and
parses only new or replaced files); ``has_shard`` / ``shard_info`` read one record. Leftover
temporary or orphan files are ignored (``cleanup`` removes temporaries). Several processes (DDP
ranks) may write shards to one store concurrently, as long as their shard keys differ (use keys
such as ``(rank, batch_index)``).

Task ids are stored per shard as indices into that shard's ``task_values`` (the raw ids seen), so
ranks need not agree on a task order while harvesting; :meth:`FeatureStore.load` maps them to the
store's ``task_names`` (given up front, or the sorted union of all records' raw ids, see
:func:`canonical_task_names`).

``load`` de-duplicates samples by their global index (keeping the first occurrence in shard-key
order: DistributedSampler pads ranks with repeated samples) and orders rows by that index, so the
result does not depend on the number of ranks. Jacobians come back memory-mapped: directly from the
shard when there is a single shard in order, otherwise from a merged file written once into the
split's directory (``_merged-<digest>.jacobians.npy``, with the SHA-256 it was written with in
``_merged-<digest>.jacobians.sha256``; :mod:`.merge`).

``load`` verifies each file against its SHA-256 (a bit flip or an edited shard raises
:class:`CorruptStoreError`; a damaged merged file is rebuilt from the shards) and refuses an
incomplete or inconsistent harvest (per split, per loader, the expected shards and samples, the
ranks done and a completion marker written last) with :class:`IncompleteHarvestError` unless
``allow_partial=True``, which also leaves damaged shards out (a warning names each one; they are
listed in ``FeatureStore.left_out``). Shard keys and split names read from
disk are checked to be plain names (never paths). Shard writes check the free space first and turn a
failed write into :class:`~lightning_ksm.fileio.WriteFailedError` (which says what was kept).

Older formats: format 2 (checksums and the harvest plan, every shard listed in the manifest) and
format 1 (neither) are read as they are; the first write to such a store (``initialize``,
``write_shard``, ``register_plan``, ``finish_rank``) migrates it: a record file per listed shard,
then the manifest without the list (``migrated_from`` says from which format; a format-1 store stays
"possibly incomplete"). A migration cut short reads the same and is finished by the next write.
:meth:`FeatureStore.manifest` returns the merged view (store-level fields plus ``splits``) in every
format.
"""

import os  # noqa: F401  (tests patch store.os.replace)

from ..task_ids import canonical_task_names, dedup_positions, normalize_task_id
from .errors import CorruptStoreError, IncompleteHarvestError, StoreError
from .feature_store import FeatureStore
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, RECORDS, shard_key

__all__ = ["FeatureStore", "shard_key", "canonical_task_names", "normalize_task_id", "dedup_positions", "FORMAT_NAME",
           "FORMAT_VERSION", "MANIFEST", "RECORDS", "StoreError", "CorruptStoreError", "IncompleteHarvestError"]
