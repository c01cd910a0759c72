"""The harvest runner: dataloaders -> fixed chunks -> projected Jacobians at W0 -> shards in a store.

One resume design: a chunk's shard key depends only on the data (loader number, chunk number, see
:func:`~lightning_ksm.harvesting.batches.loader_chunks`), so a rerun over the same data skips every
chunk whose shard is stored, without loading it; a stored shard whose samples differ from the
chunk's (the data changed) is an error. DDP: rank r harvests chunks ``c % world == r`` into the same
store, and the store merges them by global sample index. Synchronising ranks (barriers) is the
caller's job; the runner needs no Trainer and no Lightning.

Completeness: before the first shard, :meth:`HarvestRunner.run` records in the store what a
complete harvest is (every loader's chunks and samples, the number of ranks); each rank marks
itself done at the end, and the last one writes the completion marker
(:mod:`lightning_ksm.store.plan`), so that a killed run or a dead rank leaves a store that
``load`` refuses instead of one that silently yields a partial report.

A plan entry is ``(split, loader)`` or ``(split, loader, name[, reader])``: ``name`` labels the
loader in every error (with the dataset indices of the failing chunk) and ``reader`` overrides the
runner's reader for that loader (e.g. a target loader read as one group, see
:mod:`.scan`).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..config import HarvestConfig
from ..fileio import atomic_torch_save, torch_load_safe
from ..store import FeatureStore
from .batches import BatchReader, loader_chunks, take, to_device, tolist
from .harvest import Harvester
from .params import projector_for_model, resolve_projection, select_parameters
from .readout import READOUT_MODES, ReadoutBuilder, preconditioned_projector

PRECONDITIONER_FILE = "preconditioner.pt"  # in the store: a resumed harvest reuses the first one

__all__ = ["HarvestRunner", "plan_entries", "expected_shards"]


def plan_entries(plan: Sequence[tuple], reader: BatchReader) -> list:
    """``[(split, loader, name, reader), ...]`` from plan entries of 2 to 4 items."""
    out, count = [], {}
    for entry in plan:
        split, loader = entry[0], entry[1]
        count[split] = count.get(split, 0) + 1
        name = entry[2] if len(entry) > 2 and entry[2] else f"{split} loader {count[split] - 1}"
        out.append((split, loader, name, entry[3] if len(entry) > 3 and entry[3] is not None else reader))
    return out


def expected_shards(loader, loader_no: int, batch_size: int | None) -> dict:
    """``{"samples": n, "shards": {key: rows}}`` of a map-style loader (None/None: iterable)."""
    from torch.utils.data import IterableDataset

    if isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        return {"samples": None, "shards": None}
    n = len(loader.dataset)
    size = batch_size or loader.batch_size or 32
    return {"samples": n, "shards": {f"l{loader_no}-c{c}": min(size, n - start)
                                     for c, start in enumerate(range(0, n, size))}}


def _where(name: str, key: str, index: np.ndarray, exc: BaseException) -> str:
    """The error text of a failing chunk, with dataset indices instead of positions in the chunk."""
    first = int(index[0]) if len(index) else 0
    text = re.sub(r"batch \d+, sample (\d+)", lambda m: f"dataset index {first + int(m.group(1))}", str(exc))
    text = re.sub(r"^batch \d+: ", "", text)
    span = f"dataset indices {int(index[0])}..{int(index[-1])}" if len(index) else "an empty chunk"
    return f"{name}, chunk {key} ({span}): {text}"


class HarvestRunner:
    """Harvest ``plan`` = ``[(split, DataLoader), ...]`` of ``model`` at ``weights`` into ``store``.

    Args:
        model: the model (its current parameters are used where ``weights`` has no entry).
        store: a :class:`~lightning_ksm.store.FeatureStore` or its directory.
        config: the :class:`~lightning_ksm.config.HarvestConfig` (or a dict of its fields).
        reader: how to read (inputs, labels, task ids) out of a batch.
        weights: the W0 snapshot ``{name: tensor}`` (None: the model's current weights).
        forward_fn: ``fn(model, inputs) -> outputs``; default ``model(inputs)``.
        rank, world: this process's share of the chunks.
        progress: show a progress bar (shards).
        meta: extra JSON-able facts recorded in the store's manifest (e.g. the W0 path).
        preconditioner: ``{name: 1 / sqrt(sqrt(v_hat) + eps)}`` from the watched Adam-type
            optimizer (:func:`~lightning_ksm.harvesting.readout.adam_preconditioner`): gradients are
            scaled by it before the projection (``config.precondition="auto"``; the factorized
            projection folds a rank-one approximation of it into its factors); the first harvest
            into a store keeps it there for a resume.

    The parameter selection, the projector and the per-sample engine are set up once, here. With
    ``config.exact_readout`` > 0 the source shards also carry the exact target readout
    (:mod:`.readout`): the target loaders are read once more, whole, on every rank, before the first
    source shard that is computed.
    """

    def __init__(
        self,
        model: nn.Module,
        store: FeatureStore | str,
        *,
        config: HarvestConfig | dict | None = None,
        reader: BatchReader | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        forward_fn: Callable | None = None,
        rank: int = 0,
        world: int = 1,
        progress: bool = False,
        meta: dict | None = None,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = HarvestConfig.coerce(config)
        self.config.validate()
        if not isinstance(rank, int) or not isinstance(world, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank!r}, world={world!r}")
        self.model, self.reader = model, reader or BatchReader()
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store, dtype=self.config.jacobian_dtype)
        self.rank, self.world, self.progress = rank, world, progress
        self.forward_fn, self.weights, self.meta = forward_fn, weights, dict(meta or {})
        self.params = select_parameters(model, include=self.config.include, exclude=self.config.exclude)
        kind = resolve_projection(model, self.params, self.config)  # "auto" and the exact-gradient rule
        draws = {} if kind in ("identity", "factorized") else {"draws": self.config.proj_draws}
        self.projector = projector_for_model(model, kind, None if kind == "identity" else self.config.proj_dim,
                                             self.config.proj_seed, **draws, params=self.params)
        self.shards_computed = 0
        self.shards_skipped = 0
        self.completeness: dict | None = None  # the store's completeness after this rank's run
        self._harvester: Harvester | None = None
        usable = self.config.precondition == "auto"
        self._offered_scale = dict(preconditioner) if (preconditioner and usable) else None
        self._scale_resolved = False
        self._scale: dict | None = None

    def preconditioner(self) -> dict | None:
        """The gradient scale of this harvest: the one stored with the features if there is one
        (a resumed harvest must scale like the first), else the offered one (then stored)."""
        if self._scale_resolved:
            return self._scale
        path = os.path.join(self.store.directory, PRECONDITIONER_FILE)
        if os.path.exists(path):
            self._scale = torch_load_safe(path)
        elif self._offered_scale is not None:
            missing = [n for n in self.params if n not in self._offered_scale]
            self._scale = None if missing else {n: self._offered_scale[n].detach().float().cpu() for n in self.params}
            if self._scale is not None and self.rank == 0:
                os.makedirs(self.store.directory, exist_ok=True)
                atomic_torch_save(self._scale, path)
        self._scale_resolved = True
        return self._scale

    def _projector(self):
        scale = self.preconditioner()
        return self.projector if scale is None else preconditioned_projector(self.projector, scale)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def _make_harvester(self, weights) -> Harvester:
        device = self.device
        if weights is not None:
            weights = {n: t.to(device) for n, t in weights.items()}
        return Harvester(self.model, projector=self._projector(), params=self.params, mode=self.config.output,
                         weights=weights, forward_fn=self.forward_fn, chunk_size=self.config.chunk_size,
                         device=device, grad_engine=self.config.grad_engine,
                         sequence_labels=self.config.sequence_labels)

    def probe(self, plan: Sequence[tuple]) -> None:
        """Harvest two samples of each loader's first chunk at the current weights, discarding them.

        Task ids are readable, the output mode fits the model's output, labels fit the mode and
        gradients are finite: bad input fails here (before training) rather than after training.
        Returns the number of classes the model outputs (None for scalar modes).
        """
        harvester = self._make_harvester(None)
        device = harvester.device
        with harvester.session():
            for split, loader, name, reader in plan_entries(plan, self.reader):
                first = next(loader_chunks(loader, reader, batch_size=self.config.harvest_batch_size), None)
                if first is None:
                    raise ValueError(f"the {name} has no samples; every target group needs samples")
                key, index, batch = first
                try:
                    batch = batch() if callable(batch) else batch
                    inputs, labels, task_ids = reader.read(batch)
                    probe = slice(0, min(2, len(labels)))
                    harvester.batch((to_device(take(inputs, probe), device), to_device(labels[probe], device),
                                     tolist(task_ids)[probe]))
                except (ValueError, TypeError) as exc:
                    raise type(exc)(_where(name, key, index, exc)) from exc
        return harvester._n_classes

    def initialize_store(self) -> None:
        """Create (or check against) the store's manifest: projector, output mode, parameters."""
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if n in set(self.params)}
        self.store.initialize(projector_config=self.projector.config(), mode=self.config.output_name, params=shapes,
                              meta={**self.meta, "projection_seed": self.config.proj_seed,
                                    "preconditioned": self.preconditioner() is not None})

    def run(self, plan: Sequence[tuple]) -> dict:
        """Harvest this rank's chunks of every ``(split, loader)`` in ``plan`` that is not stored yet.

        Sample indices are global per split: the loaders of one split follow each other. Returns
        ``{"computed": shards written now, "skipped": shards found stored}``.
        """
        if self._harvester is None:  # the engine is set up once per harvest, not per batch
            self._harvester = self._make_harvester(self.weights)
        harvester, device = self._harvester, self._harvester.device
        entries = plan_entries(plan, self.reader)
        expected: dict = {}
        for loader_no, (split, loader, _, _) in enumerate(entries):
            expected.setdefault(split, {})[f"l{loader_no}"] = expected_shards(loader, loader_no,
                                                                              self.config.harvest_batch_size)
        self.store.register_plan(self.world, expected)
        filled: dict = {}
        offsets: dict = {}
        readout = _LazyReadout(self, entries, harvester)
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(desc="TaskAttribution harvest", unit="shard", leave=False)
        try:
            with harvester.session():
                for loader_no, (split, loader, name, reader) in enumerate(entries):
                    offset = offsets.get(split, 0)
                    iterable = expected[split][f"l{loader_no}"]["shards"] is None
                    written, samples = {}, 0
                    for key, index, batch in loader_chunks(loader, reader, rank=self.rank, world=self.world,
                                                           offset=offset, loader_no=loader_no,
                                                           batch_size=self.config.harvest_batch_size):
                        samples += len(index)
                        if len(index):
                            written[key] = len(index)
                        if self._stored(split, key, index):
                            self.shards_skipped += 1
                            continue
                        try:
                            batch = batch() if callable(batch) else batch
                            inputs, labels, task_ids = reader.read(batch)
                            inputs, labels = to_device(inputs, device), to_device(labels, device)
                            feats = harvester.batch((inputs, labels, tolist(task_ids)))
                            extra = readout.for_chunk(inputs, labels) if split == "source" and feats else {}
                        except (ValueError, TypeError) as exc:
                            raise type(exc)(_where(name, key, index, exc)) from exc
                        if feats is None:
                            continue
                        self.store.write_shard(
                            split, key, outputs=feats.outputs, jacobians=feats.jacobians, labels=feats.labels,
                            task_ids=feats.task_ids, task_values=feats.task_values, sample_index=index, **extra,
                        )
                        self.shards_computed += 1
                        if bar is not None:
                            bar.update(1)
                    if iterable and self.rank == 0:
                        filled.setdefault(split, {})[f"l{loader_no}"] = {"samples": samples, "shards": written}
                    size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else 10**9
                    offsets[split] = offset + size
        finally:
            if bar is not None:
                bar.close()
        self.completeness = self.store.finish_rank(self.rank, filled)
        return {"computed": self.shards_computed, "skipped": self.shards_skipped}

    def _stored(self, split: str, key: str, index: np.ndarray) -> bool:
        info = self.store.shard_info(split, key)
        if info is None:
            return False
        stored = self.store.shard_index(split, key)
        if info["rows"] != len(index) or (stored is not None and not np.array_equal(stored, index)):
            raise ValueError(
                f"shard {key!r} of split {split!r} is already stored with other samples ({info['rows']} rows, "
                f"this chunk has {len(index)}): the data or harvest_batch_size changed since the harvest "
                "was written; harvest into a new directory (or pass overwrite=True to the callback)"
            )
        return True


class _LazyReadout:
    """The exact target readout of source chunks, set up at the first chunk that needs it: the
    target loaders are read whole (every rank: the same directions without communication)."""

    def __init__(self, runner: HarvestRunner, entries: list, harvester: Harvester):
        self.runner, self.entries, self.harvester = runner, entries, harvester
        self.builder: ReadoutBuilder | None = None
        self.enabled = (runner.config.exact_readout > 0 and harvester.mode_name in READOUT_MODES
                        and any(e[0] == "target" for e in entries) and any(e[0] == "source" for e in entries))

    def for_chunk(self, inputs, labels) -> dict:
        if not self.enabled:
            return {}
        if self.builder is None:
            self.builder = self._build()
        try:
            readout = self.builder.source(inputs, labels)
        except (NotImplementedError, RuntimeError) as exc:  # an op without forward-mode AD
            warnings.warn(f"exact readout off for this harvest: the model's forward pass has no forward-mode "
                          f"derivative ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); GradEx reads the "
                          "target through the projection (scaled-dot-product attention already runs on its math "
                          "kernel for this pass; another op lacks forward-mode AD: replace it, or accept "
                          "target_readout='projected')", stacklevel=2)
            self.enabled = False
            return {}
        return {"readout": readout, "readout_columns": self.builder.columns}

    def _build(self) -> ReadoutBuilder:
        runner, device = self.runner, self.harvester.device
        scale = runner.preconditioner()
        if scale is not None and runner.projector.kind in ("factorized", "tensorsketch"):  # as the features apply it
            scale = self.harvester.projector.effective_scale()
        builder = ReadoutBuilder(self.harvester.engine, self.harvester.mode_name, scale,
                                 max_columns=runner.config.exact_readout)
        for split, loader, name, reader in self.entries:
            if split != "target":
                continue
            for key, index, batch in loader_chunks(loader, reader, batch_size=runner.config.harvest_batch_size):
                try:
                    batch = batch() if callable(batch) else batch
                    inputs, labels, task_ids = reader.read(batch)
                    if len(labels):
                        builder.add_target(to_device(inputs, device), to_device(labels, device), tolist(task_ids))
                except (ValueError, TypeError) as exc:
                    raise type(exc)(_where(name, key, index, exc)) from exc
        # columns in a fixed order (not the store's, which grows with the shards): a resumed harvest
        # must name them like the first one did
        builder.finish_targets()
        return builder
