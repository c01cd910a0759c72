"""The split's Jacobians as one memory-mapped array: a merged file written once per shard set.

The merged file is a cache of the (checksummed) shards, so it is checked like them: its SHA-256 is
computed while it is written and kept next to it (``_merged-<digest>.jacobians.sha256``, written
before the merged file is moved into place); a load with ``verify`` streams the file through
SHA-256 in 8 MiB blocks before mapping it (one sequential read, the same cost as checking the
shards' own checksums) and rebuilds it from the shards on a mismatch or a missing checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid

import numpy as np

from ..fileio import WriteFailedError, atomic_write_bytes, ensure_free_space, is_out_of_space

__all__ = ["merged_jacobians", "sha256_file"]

_HASH_BLOCK = 8 * 2**20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def merged_jacobians(store, split: str, shards: list, keep: np.ndarray, total: int, *,
                     verify: bool = True) -> np.ndarray:
    """The split's Jacobians in ``keep`` order, memory-mapped from a merged file written once.

    The merged file's name digests the shards' checksums (an edited shard never reuses a stale
    merge); it is written with plain writes after a free-space check (never through a writable
    memory map, which dies with SIGBUS on a full disk) and only mapped when its size is complete
    and, with ``verify``, its content matches the checksum recorded when it was written (a damaged
    merge is rebuilt from the shards, never trusted).
    """
    if len(shards) == 1 and np.array_equal(keep, np.arange(total)):
        return store._open(split, shards[0], "jacobians")
    ident = [[s["key"], s["rows"], (s.get("sha256") or {}).get("jacobians")] for s in shards]
    digest = hashlib.sha1(json.dumps(ident).encode() + keep.tobytes()).hexdigest()[:16]
    split_dir = os.path.join(store.directory, split)
    path = os.path.join(split_dir, f"_merged-{digest}.jacobians.npy")
    first = store._open(split, shards[0], "jacobians")
    shape = (len(keep),) + first.shape[1:]
    header = _npy_header(first.dtype, shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * first.dtype.itemsize
    sum_path = path[: -len(".npy")] + ".sha256"
    if os.path.exists(path):
        if os.path.getsize(path) == len(header) + nbytes and (not verify or _intact(path, sum_path)):
            with contextlib.suppress(ValueError, OSError):
                cached = np.load(path, mmap_mode="r", allow_pickle=False)
                if cached.shape == shape and cached.dtype == first.dtype:
                    return cached
        for stale in (path, sum_path):  # short, damaged or foreign: never mapped, rebuilt
            with contextlib.suppress(OSError):
                os.remove(stale)
    ensure_free_space(split_dir, len(header) + nbytes, what=f"the merged Jacobians of split {split!r}",
                      kept="the harvest itself is intact")
    starts = np.cumsum([0] + [s["rows"] for s in shards])
    tmp = os.path.join(split_dir, f"._merged-{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")
    try:
        arrays = [store._open(split, s, "jacobians") for s in shards]
        digest_of_file = hashlib.sha256(header)
        with open(tmp, "wb") as out:
            out.write(header)
            step = max(1, (64 * 2**20) // max(1, first[0:1].nbytes))
            for j in range(0, len(keep), step):
                rows = keep[j: j + step]
                which = np.searchsorted(starts, rows, side="right") - 1
                block = np.empty((len(rows),) + first.shape[1:], dtype=first.dtype)
                for w in np.unique(which):
                    sel = which == w
                    block[sel] = arrays[w][rows[sel] - starts[w]]
                data = block.tobytes()
                digest_of_file.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        atomic_write_bytes(sum_path, digest_of_file.hexdigest().encode("ascii"))  # before the file it checks
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_out_of_space(exc):
            raise WriteFailedError(exc.errno, f"the merged Jacobians of split {split!r} could not be written to "
                                              f"{split_dir} (the disk is full); the harvest itself is intact and "
                                              "the partial file was removed") from exc
        # Read-only store: fall back to an in-memory copy.
        return np.concatenate([np.asarray(a) for a in arrays])[keep]
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _intact(path: str, sum_path: str) -> bool:
    """Whether the merged file matches the checksum recorded when it was written (one without a
    recorded checksum, e.g. from an earlier version, is rebuilt once)."""
    try:
        with open(sum_path, "rb") as f:
            want = f.read(200).decode("ascii").strip()
        return bool(want) and sha256_file(path) == want
    except (OSError, UnicodeDecodeError):
        return False


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": tuple(int(x) for x in shape)})
    return buf.getvalue()
