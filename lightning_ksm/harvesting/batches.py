"""Batches for the harvest: reading (inputs, labels, task ids) out of a user's batch (a dict key, a
tuple position or a callable), and walking a DataLoader's dataset in fixed, rank-sharded chunks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch

from .hf import model_inputs

__all__ = ["BatchReader", "describe", "loader_chunks", "scan_task_ids", "as_loader_list", "to_device", "take",
           "tolist"]

Key = Union[str, int, Callable[[Any], Any], None]

_DEFAULTS = {"inputs": (0, ("x", "input", "inputs")), "labels": (1, ("y", "label", "labels", "target")),
             "task_ids": (2, ("task", "task_id", "task_ids"))}


def describe(batch: Any, depth: int = 0) -> str:
    """A short structural description of a batch, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{tuple(batch.shape)}:{str(batch.dtype).replace('torch.', '')}"
    if depth > 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in list(batch.items())[:12])
        return "{" + inner + "}"
    if isinstance(batch, (list, tuple)):
        inner = ", ".join(describe(v, depth + 1) for v in list(batch)[:12])
        return ("(" if isinstance(batch, tuple) else "[") + inner + (")" if isinstance(batch, tuple) else "]")
    return type(batch).__name__


class BatchReader:
    """Extracts model inputs, labels and task ids from a batch.

    Each of ``input_key``, ``label_key`` and ``task_key`` is a dict key (str), a position in a
    tuple/list batch (int), or a callable ``fn(batch) -> value``. ``None`` means: position 0 / 1 / 2
    for tuple batches; for dict batches the first present of ("x", "input", "inputs"),
    ("y", "label", "labels", "target") and ("task", "task_id", "task_ids"); a dict batch with
    ``input_ids`` and none of the input names (Hugging Face's layout) gives its model-input keys
    (``input_ids``, ``attention_mask``, ... :data:`~lightning_ksm.harvesting.hf.MODEL_INPUTS`) as a
    dict, which the model gets as keywords.
    """

    def __init__(self, input_key: Key = None, label_key: Key = None, task_key: Key = None):
        for name, key in (("input_key", input_key), ("label_key", label_key), ("task_key", task_key)):
            if key is not None and not isinstance(key, (str, int)) and not callable(key):
                raise TypeError(f"{name} must be a str (dict key), an int (tuple position) or a callable, got {key!r}")
        self.keys = {"inputs": input_key, "labels": label_key, "task_ids": task_key}

    def _get(self, batch: Any, what: str):
        key = self.keys[what]
        argname = {"inputs": "input_key", "labels": "label_key", "task_ids": "task_key"}[what]
        if callable(key) and not isinstance(key, (str, int)):
            try:
                return key(batch)
            except Exception as exc:
                raise ValueError(
                    f"{argname} callable failed on a batch with structure {describe(batch)}: {exc}"
                ) from exc
        position, names = _DEFAULTS[what]
        if isinstance(batch, Mapping):
            if key is None:
                found = [n for n in names if n in batch]
                if what == "inputs" and not found and "input_ids" in batch:
                    return model_inputs(batch)
                if not found:
                    raise ValueError(
                        f"cannot find the {what.replace('_', ' ')} in a dict batch with keys {list(batch)}: "
                        f"none of {list(names)} is present; set {argname}= to the right key. "
                        f"Batch structure: {describe(batch)}"
                    )
                key = found[0]
            if not isinstance(key, str) or key not in batch:
                raise ValueError(
                    f"{argname}={key!r} is not a key of the batch (keys: {list(batch)}); "
                    f"batch structure: {describe(batch)}"
                )
            return batch[key]
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            key = position if key is None else key
            if not isinstance(key, int) or not -len(batch) <= key < len(batch):
                raise ValueError(
                    f"{argname}={key!r} is not a position of the batch, which has {len(batch)} element(s); "
                    f"batch structure: {describe(batch)}. Return (inputs, labels, task_ids) from your "
                    "dataset or set input_key/label_key/task_key"
                )
            return batch[key]
        raise ValueError(
            f"cannot read {what.replace('_', ' ')} from a batch of type {type(batch).__name__}; "
            f"use a tuple/dict batch or give {argname} as a callable. Batch structure: {describe(batch)}"
        )

    def read(self, batch: Any):
        """Return ``(inputs, labels, task_ids)`` with task ids as a list or 1-D tensor, checked."""
        inputs = self._get(batch, "inputs")
        labels = self._get(batch, "labels")
        tasks = self._get(batch, "task_ids")
        if isinstance(tasks, torch.Tensor):
            if tasks.ndim != 1:
                raise ValueError(
                    f"task ids must be one per sample (a 1-D tensor or a list), got a tensor of shape "
                    f"{tuple(tasks.shape)}; batch structure: {describe(batch)}"
                )
            n_tasks = len(tasks)
        elif isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
            n_tasks = len(tasks)
        else:
            raise ValueError(
                f"task ids must be a 1-D tensor or a list with one id per sample, got {type(tasks).__name__}; "
                f"batch structure: {describe(batch)}"
            )
        n = len(labels) if hasattr(labels, "__len__") else None
        if n is not None and n != n_tasks:
            raise ValueError(
                f"the batch has {n} labels but {n_tasks} task ids; they must match (batch structure: {describe(batch)})"
            )
        return inputs, labels, tasks


def as_loader_list(loaders, what: str) -> list:
    """A list of DataLoaders from one loader, a list/tuple or a dict of them (``what`` names the data)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    for dl in loaders:
        if not hasattr(dl, "dataset"):
            raise ValueError(f"the {what} data must be torch DataLoaders, got {type(dl).__name__}")
    return list(loaders)


def loader_chunks(loader, reader: BatchReader, *, rank: int = 0, world: int = 1, offset: int = 0,
                  loader_no: int = 0, batch_size: int | None = None) -> Iterator:
    """Yield ``(shard_key, global_index, batch)`` for this rank's share of ``loader``, in dataset order.

    A map-style dataset is cut into fixed chunks of ``batch_size`` (default: the loader's) by
    position, chunk c going to rank ``c % world``; ``batch`` is then a zero-argument callable that
    collates the chunk (so a resumed harvest skips stored chunks without loading them). An iterable
    dataset cannot be sharded by index: rank 0 reads it all, in the loader's batches. Keys are
    stable for the same data and batch size, which is what resume relies on.
    """
    from torch.utils.data import IterableDataset

    dataset, collate = loader.dataset, loader.collate_fn
    size = batch_size or loader.batch_size or 32
    if isinstance(dataset, IterableDataset):
        if rank != 0:
            return
        seen = 0
        for b, batch in enumerate(loader):
            n = len(reader.read(batch)[1])
            yield f"l{loader_no}-b{b}", np.arange(offset + seen, offset + seen + n), batch
            seen += n
        return
    n = len(dataset)
    for c, start in enumerate(range(0, n, size)):
        if c % world != rank:
            continue
        idx = np.arange(start, min(start + size, n))
        yield f"l{loader_no}-c{c}", offset + idx, (lambda idx=idx: collate([dataset[int(i)] for i in idx]))


def scan_task_ids(loaders: Sequence, reader: BatchReader) -> list:
    """Every task id in ``loaders`` (reading the data, not running the model), sorted like the store."""
    seen = set()
    for loader_no, loader in enumerate(loaders):
        for _, _, batch in loader_chunks(loader, reader, loader_no=loader_no, batch_size=1024):
            batch = batch() if callable(batch) else batch
            seen.update(tolist(reader.read(batch)[2]))
    return sorted(seen, key=lambda v: (isinstance(v, str), v))


def tolist(task_ids) -> list:
    return task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids)


def take(inputs, sl):
    """``inputs[sl]`` through dicts, lists and tuples of tensors."""
    if isinstance(inputs, torch.Tensor):
        return inputs[sl]
    if isinstance(inputs, dict):
        return {k: take(v, sl) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(take(v, sl) for v in inputs)
    return inputs


def to_device(obj, device):
    """Move tensors (through dicts, lists and tuples) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
