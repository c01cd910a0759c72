"""Atomic file writes, the one place the package writes files that a reader may open concurrently.

A reader sees either the old file or the complete new one, never a torn one: data go to a
temporary sibling (a hidden name, unique per process and call), are flushed and fsynced, and the
temporary file is moved onto the final name with ``os.replace``. On any failure the temporary file
is removed and the error propagates; the old file, if any, is untouched. New files get the
permissions the process's umask gives (no forced mode).

Large writes check the free space first where the size is known (:func:`ensure_free_space`); a
write that fails for lack of space (or any other ``OSError``) can be turned into a
:class:`WriteFailedError` that says what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import shutil
import uuid
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_save_npy", "atomic_torch_save",
           "fsync_dir", "exclusive_lock", "WriteFailedError", "InsufficientSpaceError", "ensure_free_space",
           "remove_temp_files", "is_out_of_space", "torch_load_safe"]

#: Headroom kept free on top of a write's own size (metadata, other writers).
SPACE_MARGIN = 16 * 2**20


class WriteFailedError(OSError):
    """A file could not be written; the message says what was written and what was kept."""


class InsufficientSpaceError(WriteFailedError):
    """Not enough free space for a write whose size is known in advance (nothing was written)."""


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or quota (ENOSPC, EDQUOT, EFBIG) or a short write."""
    if isinstance(exc, InsufficientSpaceError):
        return True
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
    return isinstance(exc, OSError) and (exc.errno in codes or "written" in str(exc))


def ensure_free_space(directory: str | os.PathLike, nbytes: int, *, what: str, kept: str = "") -> None:
    """Raise :class:`InsufficientSpaceError` before writing ``nbytes`` into ``directory`` when the
    filesystem has less free space than that (plus a margin). Unknown free space: no check."""
    directory = os.fspath(directory)
    probe = directory
    while probe and not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        return
    need = int(nbytes) + SPACE_MARGIN
    if free < need:
        raise InsufficientSpaceError(
            errno.ENOSPC,
            f"not enough free space in {directory} to write {what}: {nbytes / 2**20:.1f} MiB needed "
            f"(+{SPACE_MARGIN // 2**20} MiB headroom), {free / 2**20:.1f} MiB free; nothing was written"
            + (f"; {kept}" if kept else "") + ". Free some space (or choose another directory) and rerun",
        )


def remove_temp_files(path: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings that earlier, interrupted atomic writes of ``path`` left behind
    (``.<name>.tmp-*``). Only call it where no other process is writing ``path``."""
    directory, base = os.path.split(os.fspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory or "."), f".{glob.escape(base)}.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(tmp)
            removed.append(tmp)
    return removed

try:  # POSIX advisory locks; without them, only one writer process is safe.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _tmp_name(path: str) -> str:
    directory, base = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, writer: Callable[[io.BufferedWriter], Any], *, mode: int | None = None) -> None:
    """Write ``path`` through ``writer(binary_file)`` atomically.

    ``mode``: the permission bits of the new file, or None (default) to keep what the process's
    umask gives (a shared umask such as 022 shares the file; 077 keeps it private).
    """
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kwargs) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(data), **kwargs)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1, **kwargs) -> None:
    """Write ``data`` as UTF-8 JSON (NaN/inf refused: they are not JSON) atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def atomic_save_npy(path: str | os.PathLike, array, **kwargs) -> None:
    """Write a numpy array as ``.npy`` (no pickles) atomically."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False), **kwargs)


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh), **kwargs)


def torch_load_safe(path: str | os.PathLike, *, numpy: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, no pickled code.
    ``numpy=True`` also admits numpy arrays and dtypes (e.g. generator states in an RL snapshot)."""
    import numpy as np
    import torch

    if not numpy:
        return torch.load(path, map_location=map_location, weights_only=True)
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(t)) for t in np.sctypeDict.values()}, key=str)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable; skipped where unsupported (e.g. Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(os.fspath(directory), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block, so
    that processes (e.g. DDP ranks) updating one file take turns."""
    with open(os.fspath(path), "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
