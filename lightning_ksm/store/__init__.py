"""On-disk feature store for harvested per-sample features: shards per split, one manifest.

Layout of a store directory::

    manifest.json                 format version, projector config, output mode, task names,
                                  parameter names/shapes, jacobian dtype, shards of every split
    <split>/<key>.outputs.npy     one shard = five .npy files (index only when given)
    <split>/<key>.jacobians.npy
    <split>/<key>.labels.npy
    <split>/<key>.task_ids.npy    indices into the shard's own ``task_values`` list (see below)
    <split>/<key>.index.npy       optional per-sample global index (for de-duplication)

Writes are atomic: every file is written to a temporary name and moved into place with
``os.replace``; the manifest is updated last, under an exclusive file lock, so a shard exists only
once its manifest entry does. Leftover temporary or orphan files are ignored. Several processes
(DDP ranks) may write shards to one store concurrently, as long as their shard keys differ
(use keys such as ``(rank, batch_index)``).

Task ids are stored per shard as indices into that shard's ``task_values`` (the raw ids seen), so
ranks need not agree on a task order while harvesting; :meth:`FeatureStore.load` maps them to the
store's ``task_names`` (given up front, or the sorted union of all raw ids, see
:func:`canonical_task_names`).

``load`` de-duplicates samples by their global index (keeping the first occurrence in shard-key
order: DistributedSampler pads ranks with repeated samples) and orders rows by that index, so the
result does not depend on the number of ranks. Jacobians come back memory-mapped: directly from the
shard when there is a single shard in order, otherwise from a merged file written once into the
split's directory (``_merged-<digest>.jacobians.npy``; :mod:`.merge`).

Format 2 (:mod:`.manifest`) adds, per shard, the SHA-256 of each of its files (``load`` verifies
them: a bit flip or an edited shard raises :class:`CorruptStoreError`), and the ``harvest`` record
of what a complete harvest is (:mod:`.plan`): per split, per loader, the expected shards and
samples, the ranks done and a completion marker written last. ``load`` refuses an incomplete or
inconsistent harvest with :class:`IncompleteHarvestError` unless ``allow_partial=True``. Shard
keys and split names read from the manifest are checked to be plain names (never paths). Shard
writes check the free space first and turn a failed write into
:class:`~lightning_ksm.fileio.WriteFailedError` (which says what was kept).
"""

import os  # noqa: F401  (tests patch store.os.replace)

from ..task_ids import canonical_task_names, dedup_positions, normalize_task_id
from .errors import CorruptStoreError, IncompleteHarvestError, StoreError
from .feature_store import FeatureStore
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, shard_key

__all__ = ["FeatureStore", "shard_key", "canonical_task_names", "normalize_task_id", "dedup_positions", "FORMAT_NAME",
           "FORMAT_VERSION", "MANIFEST", "StoreError", "CorruptStoreError", "IncompleteHarvestError"]
