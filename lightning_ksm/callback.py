"""The Lightning callback ``TaskAttribution``: a thin adapter that decides WHEN the engine runs and
WHERE its files go.

Lifecycle during ``trainer.fit``:

1. ``setup``: resolve the output directory (like ``ModelCheckpoint`` resolves ``dirpath``).
2. ``on_train_start``: snapshot W0 (default) and check the first source and target batches: task
   ids are readable, the output mode fits the model's output, gradients are finite. Bad input fails
   here, before any training step.
3. first real validation epoch after the snapshot (never the sanity check): harvest per-sample
   outputs and projected Jacobians at W0 for the source data and every validation dataloader,
   streamed to an on-disk feature store, sharded across DDP ranks. The model being trained, its
   optimizer, RNG states and logged metrics are untouched (the harvest evaluates W0 functionally).
4. ``on_fit_end``: rank 0 runs GradEx, the surrogate and the readouts (:func:`run_analysis`), writes
   the :class:`AttributionReport` and logs its scores to every logger. If the analysis fails, the
   harvest and the trained model are kept and the warning says how to rerun it
   (``lightning-ksm analyze DIR``).

The implementation lives in :class:`_TaskAttributionCore`, which uses only the trainer API shared by
``lightning.pytorch`` and ``pytorch_lightning``; the two namespaces get their own subclass
(``lightning_ksm.TaskAttribution`` and ``lightning_ksm.pl.TaskAttribution``).
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .analysis import AnalysisConfig
from .batch import BatchReader
from .harvest import harvest, projector_for_model, select_parameters
from .store import FeatureStore

__all__ = ["TaskAttributionMixin"]

_STATE_VERSION = 1


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TaskAttributionMixin:
    """Task attribution from one training run (namespace-independent core; see the module docs).

    Args:
        task_key, input_key, label_key: how to read task ids, model inputs and labels from a batch:
            a dict key, a tuple position, or a callable ``fn(batch)``. Defaults: positions 2 / 0 / 1
            of tuple batches; keys "task" / "x" / "y" (and common synonyms) of dict batches.
        source: the source (training) data: ``"train"`` (the trainer's train dataloader) or a
            ``DataLoader``.
        target: the target data: ``"val"`` (every validation dataloader) or a ``DataLoader`` or a
            list of them. Target groups are the task ids found there, plus "all".
        snapshot: when to take W0: ``"fit_start"`` (default), ``"epoch:N"`` (at the start of epoch N),
            or a path to a Lightning checkpoint whose ``state_dict`` holds W0.
        include, exclude: parameter-name patterns (globs, or ``"re:"`` regexes) of the parameters to
            linearize; default every trainable parameter.
        projection: ``"sjlt"`` (sparse sign sketch, default), ``"gaussian"``, ``"rademacher"``.
        proj_dim: projection dimension k.
        proj_seed: projection seed.
        output: ``"margin"`` (default; classification), ``"logits"``, ``"regression"``,
            ``"logistic"``, or a callable ``fn(outputs, labels) -> per-sample scalar``.
        forward_fn: ``fn(module, inputs) -> outputs``; default ``module(inputs)``.
        n_subsets, subset_p, subset_size, lam, weighting, kernel, gamma, alpha, n_groups,
        best_subset_size, seed: analysis settings, see :class:`lightning_ksm.analysis.AnalysisConfig`.
        dirpath: output directory; default ``<logger log dir>/ksm`` or ``<default_root_dir>/ksm``.
        chunk_size: per-sample gradients held in memory at once during the harvest.
        harvest_batch_size: samples per stored shard (default: each dataloader's batch size).
        jacobian_dtype: ``"float32"`` or ``"float16"`` on disk.
        task_names: the source task ids, if known; checked at the first batch. Otherwise the source
            dataset's task ids are scanned once (without the model) at train start.
        progress: show progress bars for the harvest and GradEx.
        raise_on_analysis_error: re-raise an analysis failure instead of warning (the harvest is
            kept either way).
        overwrite: a fresh (not resumed) run whose output directory already holds an earlier run's
            harvest fails at train start unless this is True, in which case the old harvest, W0 and
            report are deleted first. Resuming from a checkpoint reuses the harvest on purpose.

    After ``fit``, ``callback.report`` holds the :class:`AttributionReport` (rank 0) and
    ``callback.report_dir`` its directory.
    """

    def __init__(
        self,
        *,
        task_key: Union[str, int, Callable, None] = None,
        input_key: Union[str, int, Callable, None] = None,
        label_key: Union[str, int, Callable, None] = None,
        source: Any = "train",
        target: Any = "val",
        snapshot: str = "fit_start",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        projection: str = "sjlt",
        proj_dim: int = 256,
        proj_seed: int = 0,
        output: Union[str, Callable] = "margin",
        forward_fn: Optional[Callable] = None,
        n_subsets: int = 200,
        subset_p: float = 0.75,
        subset_size: Optional[int] = None,
        lam: float = 1e-3,
        weighting: str = "task",
        kernel: str = "rbf",
        gamma: Optional[float] = None,
        alpha: Optional[float] = None,
        n_groups: Optional[int] = None,
        best_subset_size: Optional[int] = None,
        seed: int = 0,
        dirpath: Optional[str] = None,
        chunk_size: int = 64,
        harvest_batch_size: Optional[int] = None,
        jacobian_dtype: str = "float32",
        task_names: Optional[Sequence] = None,
        progress: bool = True,
        raise_on_analysis_error: bool = False,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.reader = BatchReader(input_key=input_key, label_key=label_key, task_key=task_key)
        if not (isinstance(source, str) and source == "train") and not hasattr(source, "dataset"):
            raise ValueError(f"source must be 'train' or a DataLoader, got {source!r}")
        if isinstance(target, str) and target != "val":
            raise ValueError(f"target must be 'val', a DataLoader or a list of DataLoaders, got {target!r}")
        self.source, self.target = source, target
        self.snapshot = snapshot
        self._snapshot_epoch = self._parse_snapshot(snapshot)
        self.include, self.exclude = include, exclude
        self.projection, self.proj_dim, self.proj_seed = projection, int(proj_dim), int(proj_seed)
        if isinstance(output, str) and output not in ("margin", "logits", "regression", "logistic"):
            raise ValueError(f"output must be 'margin', 'logits', 'regression', 'logistic' or a callable, got {output!r}")
        self.output, self.forward_fn = output, forward_fn
        self.analysis = AnalysisConfig(
            n_subsets=n_subsets, subset_p=subset_p, subset_size=subset_size, seed=seed, lam=lam, weighting=weighting,
            kernel=kernel, gamma=gamma, alpha=alpha, n_groups=n_groups, best_subset_size=best_subset_size,
        )
        self.analysis.validate(None)  # settings that do not depend on the data fail here, not after training
        if int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
        self.dirpath = dirpath
        self.chunk_size, self.harvest_batch_size = int(chunk_size), harvest_batch_size
        if jacobian_dtype not in ("float32", "float16"):
            raise ValueError(f"jacobian_dtype must be 'float32' or 'float16', got {jacobian_dtype!r}")
        self.jacobian_dtype = jacobian_dtype
        self.task_names = list(task_names) if task_names is not None else None
        self.progress, self.raise_on_analysis_error = progress, raise_on_analysis_error
        self.overwrite = overwrite
        self._resumed = False

        # Run state (what state_dict saves: paths and progress, never arrays).
        self.output_dir: Optional[str] = None
        self.w0_path: Optional[str] = None
        self.harvest_complete = False
        self.report = None
        self.analysis_error: Optional[BaseException] = None
        self.timings: dict = {}
        self._w0: Optional[dict] = None
        self._param_names: Optional[list] = None
        self._checked = False
        self.shards_computed = 0  # shards harvested by this process (resume tests read it)

    # -- configuration helpers ------------------------------------------------------------------
    @staticmethod
    def _parse_snapshot(snapshot: str) -> Optional[int]:
        if not isinstance(snapshot, str):
            raise ValueError(f"snapshot must be 'fit_start', 'epoch:N' or a checkpoint path, got {snapshot!r}")
        if snapshot == "fit_start":
            return 0
        if snapshot.startswith("epoch:"):
            try:
                epoch = int(snapshot.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"snapshot 'epoch:N' needs an integer N, got {snapshot!r}") from None
            if epoch < 0:
                raise ValueError(f"snapshot epoch must be >= 0, got {epoch}")
            return epoch
        return None  # a checkpoint path

    def _enabled(self, trainer) -> bool:
        return not getattr(trainer, "fast_dev_run", False)

    def _resolve_dir(self, trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(save_dir, str(logger.name), version, "ksm")
        return os.path.join(trainer.default_root_dir, "ksm")

    @property
    def harvest_dir(self) -> Optional[str]:
        """Where the harvest (a :class:`FeatureStore`) is written."""
        return None if self.output_dir is None else os.path.join(self.output_dir, "harvest")

    @property
    def report_dir(self) -> Optional[str]:
        """Where the :class:`AttributionReport` is written."""
        return None if self.output_dir is None else os.path.join(self.output_dir, "report")

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not self._enabled(trainer):
            return
        # Resolved here; a resumed run replaces it with its checkpoint's directory afterwards
        # (load_state_dict runs after setup), so nothing is created on disk yet.
        if self.output_dir is None:
            self.output_dir = trainer.strategy.broadcast(self._resolve_dir(trainer))

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled(trainer):
            return
        self._param_names = select_parameters(pl_module, include=self.include, exclude=self.exclude)
        if not self._resumed:
            self._guard_stale_output(trainer)
        if self.w0_path is not None and os.path.exists(self.w0_path):
            self._w0 = torch.load(self.w0_path, map_location="cpu", weights_only=True)
        elif self._snapshot_epoch is None:
            self._load_snapshot_checkpoint(trainer, pl_module)
        elif self._snapshot_epoch == 0:
            self._take_snapshot(trainer, pl_module)
        if not self._checked:
            self._check_first_batches(trainer, pl_module)
            self._checked = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._enabled(trainer) and self._w0 is None and self._snapshot_epoch == trainer.current_epoch:
            self._take_snapshot(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled(trainer) or trainer.sanity_checking or not getattr(trainer, "training", True):
            return
        if self._w0 is not None and not self.harvest_complete:
            self._run_harvest(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._enabled(trainer):
            return
        if self._w0 is None:
            warnings.warn(
                f"TaskAttribution: no W0 snapshot was taken (snapshot={self.snapshot!r} never came); "
                "nothing to analyse", stacklevel=2,
            )
            return
        if not self.harvest_complete:
            self._run_harvest(trainer, pl_module)
        if trainer.is_global_zero:
            self._analyze(trainer)
        trainer.strategy.barrier("ksm_analysis")

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "output_dir": self.output_dir,
            "w0_path": self.w0_path,
            "harvest_complete": self.harvest_complete,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.output_dir = state_dict.get("output_dir")
        self.w0_path = state_dict.get("w0_path")
        self.harvest_complete = bool(state_dict.get("harvest_complete", False))
        self._resumed = True

    def _guard_stale_output(self, trainer) -> None:
        """A fresh run must not mix its features with an earlier run's harvest in the same directory.

        Rank 0 decides and broadcasts, and every rank waits here, so no rank can see the snapshot
        this run is about to write as a stale one.
        """
        stale = None
        if trainer.is_global_zero:
            candidates = (self.harvest_dir, os.path.join(self.output_dir, "w0.pt"))
            stale = [os.path.basename(p) for p in candidates if os.path.exists(p)]
        stale = trainer.strategy.broadcast(stale)
        if stale and not self.overwrite:
            raise ValueError(
                f"TaskAttribution output directory {self.output_dir} already holds an earlier run's "
                f"{' and '.join(stale)}. Give this run its own dirpath, resume the earlier run from its "
                "checkpoint (trainer.fit(..., ckpt_path=...)), or pass overwrite=True to delete the old "
                "harvest, W0 and report"
            )
        if stale and trainer.is_global_zero:
            import shutil

            warnings.warn(f"TaskAttribution: overwrite=True, deleting the earlier harvest in {self.output_dir}", stacklevel=2)
            for path in (self.harvest_dir, self.report_dir):
                shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(os.path.join(self.output_dir, "w0.pt")):
                os.remove(os.path.join(self.output_dir, "w0.pt"))
        trainer.strategy.barrier("ksm_guard")

    # -- snapshot -------------------------------------------------------------------------------
    def _take_snapshot(self, trainer, pl_module) -> None:
        state = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters()}
        state.update({n: b.detach().to("cpu", copy=True) for n, b in pl_module.named_buffers()})
        self._w0 = state
        self.w0_path = os.path.join(self.output_dir, "w0.pt")
        if trainer.is_global_zero:
            os.makedirs(self.output_dir, exist_ok=True)
            _atomic_torch_save(state, self.w0_path)
        trainer.strategy.barrier("ksm_snapshot")

    def _load_snapshot_checkpoint(self, trainer, pl_module) -> None:
        path = self.snapshot
        if not os.path.exists(path):
            raise FileNotFoundError(f"snapshot checkpoint {path!r} does not exist (snapshot= expects 'fit_start', 'epoch:N' or a path)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"snapshot checkpoint {path!r} holds no state_dict")
        own = dict(pl_module.named_parameters())
        missing = [n for n in self._param_names if n not in state]
        if missing:
            raise ValueError(f"snapshot checkpoint {path!r} lacks parameter(s) {missing[:5]}")
        bad = [n for n in self._param_names if tuple(state[n].shape) != tuple(own[n].shape)]
        if bad:
            raise ValueError(f"snapshot checkpoint {path!r} has other shapes for parameter(s) {bad[:5]}")
        self._w0 = {n: t.detach().to("cpu", copy=True) for n, t in state.items() if isinstance(t, torch.Tensor)}
        self.w0_path = os.path.abspath(path)

    # -- data -----------------------------------------------------------------------------------
    def _source_loaders(self, trainer) -> list:
        if isinstance(self.source, str):
            loaders = trainer.train_dataloader
            if loaders is None:
                raise ValueError("TaskAttribution(source='train') found no train dataloader")
        else:
            loaders = self.source
        return self._as_list(loaders, "source")

    def _target_loaders(self, trainer) -> list:
        if isinstance(self.target, str):
            loaders = trainer.val_dataloaders
            if loaders is None:
                raise ValueError(
                    "TaskAttribution(target='val') needs validation data: define val_dataloader / pass "
                    "val_dataloaders to fit, or give target= a DataLoader"
                )
        else:
            loaders = self.target
        return self._as_list(loaders, "target")

    @staticmethod
    def _as_list(loaders, what: str) -> list:
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        for dl in loaders:
            if not hasattr(dl, "dataset"):
                raise ValueError(f"the {what} data must be torch DataLoaders, got {type(dl).__name__}")
        return list(loaders)

    def _batches(self, loader, rank: int, world: int, offset: int, loader_no: int, batch_size: int | None = None):
        """Yield (shard_key, index array, batch) for this rank's share, in dataset order."""
        from torch.utils.data import IterableDataset

        dataset, collate = loader.dataset, loader.collate_fn
        size = batch_size or self.harvest_batch_size or loader.batch_size or 32
        if isinstance(dataset, IterableDataset):
            if rank != 0:  # an iterable dataset cannot be sharded by index; rank 0 reads it all
                return
            seen = 0
            for b, batch in enumerate(loader):
                n = len(self.reader.read(batch)[1])
                yield f"l{loader_no}-b{b}", np.arange(offset + seen, offset + seen + n), batch
                seen += n
            return
        n = len(dataset)
        for c, start in enumerate(range(0, n, size)):
            if c % world != rank:
                continue
            idx = np.arange(start, min(start + size, n))
            yield f"l{loader_no}-c{c}", offset + idx, (lambda idx=idx: collate([dataset[int(i)] for i in idx]))

    def _scan_source_tasks(self, trainer) -> list:
        seen = set()
        for loader_no, loader in enumerate(self._source_loaders(trainer)):
            for _, _, batch in self._batches(loader, 0, 1, 0, loader_no, batch_size=1024):
                batch = batch() if callable(batch) else batch
                tasks = self.reader.read(batch)[2]
                seen.update(tasks.tolist() if isinstance(tasks, torch.Tensor) else list(tasks))
        return sorted(seen, key=lambda v: (isinstance(v, str), v))

    # -- checks at the first batch --------------------------------------------------------------
    def _check_first_batches(self, trainer, pl_module) -> None:
        if self.task_names is not None:
            tasks = self.task_names
        else:
            tasks = self._scan_source_tasks(trainer)
        if len(set(tasks)) < 2:
            raise ValueError(
                f"task attribution needs at least 2 source tasks; the source data has task ids {list(tasks)} "
                "(check task_key, or that every task is in the training data)"
            )
        splits = [("source", dl) for dl in self._source_loaders(trainer)]
        splits += [("target", dl) for dl in self._target_loaders(trainer)]
        for split, loader in splits:
            first = next(self._batches(loader, 0, 1, 0, 0), None)
            if first is None:
                raise ValueError(f"a {split} dataloader has no samples; every target group needs samples")
            batch = first[2]() if callable(first[2]) else first[2]
            inputs, labels, task_ids = self.reader.read(batch)
            probe = slice(0, min(2, len(labels)))
            # A two-sample harvest at the current weights: the output mode, label range and
            # gradient finiteness are checked now rather than after training.
            device = pl_module.device
            harvest(
                pl_module,
                [(_to_device(_take(inputs, probe), device), _to_device(labels[probe], device),
                  _tolist(task_ids)[probe])],
                projector=self._projector(pl_module), params=self._param_names, mode=self.output,
                forward_fn=self.forward_fn, chunk_size=self.chunk_size, device=device,
            )

    # -- harvest --------------------------------------------------------------------------------
    def _projector(self, pl_module):
        return projector_for_model(pl_module, self.projection, self.proj_dim, self.proj_seed, params=self._param_names)

    def _run_harvest(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        store = FeatureStore(self.harvest_dir, dtype=self.jacobian_dtype)
        projector = self._projector(pl_module)
        mode_name = self.output if isinstance(self.output, str) else "custom"
        shapes = {n: tuple(p.shape) for n, p in pl_module.named_parameters() if n in set(self._param_names)}
        if trainer.is_global_zero:
            store.initialize(projector_config=projector.config(), mode=mode_name, params=shapes,
                             meta={"w0_path": self.w0_path, "projection_seed": self.proj_seed})
        trainer.strategy.barrier("ksm_store_init")
        device = pl_module.device
        weights = {n: t.to(device) for n, t in self._w0.items()}
        plan = [("source", dl) for dl in self._source_loaders(trainer)]
        plan += [("target", dl) for dl in self._target_loaders(trainer)]
        offsets = {"source": 0, "target": 0}
        bar = None
        if self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            bar = tqdm(desc="TaskAttribution harvest", unit="shard", leave=False)
        for loader_no, (split, loader) in enumerate(plan):
            for key, index, batch in self._batches(loader, rank, world, offsets[split], loader_no):
                if store.has_shard(split, key):
                    continue
                batch = batch() if callable(batch) else batch
                inputs, labels, task_ids = self.reader.read(batch)
                inputs, labels = _to_device(inputs, device), _to_device(labels, device)
                feats = harvest(
                    pl_module, [(inputs, labels, list(_tolist(task_ids)))], projector=projector,
                    params=self._param_names, mode=self.output, weights=weights, forward_fn=self.forward_fn,
                    chunk_size=self.chunk_size, device=device,
                )
                store.write_shard(
                    split, key, outputs=feats.outputs, jacobians=feats.jacobians, labels=feats.labels,
                    task_ids=feats.task_ids, task_values=feats.task_names, sample_index=index,
                )
                self.shards_computed += 1
                if bar is not None:
                    bar.update(1)
            offsets[split] += len(loader.dataset) if hasattr(loader.dataset, "__len__") else 10**9
        if bar is not None:
            bar.close()
        trainer.strategy.barrier("ksm_harvest")
        self.harvest_complete = True
        self.timings["harvest"] = time.perf_counter() - start

    # -- analysis -------------------------------------------------------------------------------
    def _analyze(self, trainer) -> None:
        from .analysis import analyze_store

        try:
            report = analyze_store(self.harvest_dir, self.analysis, progress=self.progress,
                                   timings=self.timings, extra_config=self._config_record())
            report.save(self.report_dir)
        except Exception as exc:  # keep the harvest and the trained model; say how to rerun
            self.analysis_error = exc
            message = (
                f"TaskAttribution: the post-training analysis failed ({type(exc).__name__}: {exc}). "
                f"The harvest is kept in {self.harvest_dir} and the trained model is unaffected; rerun "
                f"the analysis with `lightning-ksm analyze {self.harvest_dir}` (or "
                f"lightning_ksm.analyze_store). Traceback:\n{traceback.format_exc()}"
            )
            if self.raise_on_analysis_error:
                raise RuntimeError(message) from exc
            warnings.warn(message, stacklevel=2)
            return
        self.report = report
        self._log_report(trainer, report)

    def _config_record(self) -> dict:
        return {
            "callback": {
                "snapshot": self.snapshot, "include": self.include, "exclude": self.exclude,
                "projection": self.projection, "proj_dim": self.proj_dim,
                "output": self.output if isinstance(self.output, str) else "custom",
                "chunk_size": self.chunk_size, "jacobian_dtype": self.jacobian_dtype,
            },
            "projection_seed": self.proj_seed,
        }

    def _log_report(self, trainer, report) -> None:
        metrics = report.summary_metrics()
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            _log_rich(logger, report, self.report_dir, step)
            logger.save()


def _log_rich(logger, report, report_dir: str, step: int) -> None:
    """A figure or table where the logger supports one (TensorBoard image + text, W&B table).

    The imports are optional and a failure here only warns: logging must never fail the run.
    """
    name = type(logger).__name__
    try:
        if name == "TensorBoardLogger":
            writer = logger.experiment
            writer.add_text("ksm/report", "```\n" + report.to_text(max_rows=10) + "\n```", global_step=step)
            png = os.path.join(report_dir, "scores.png")
            if os.path.exists(png):
                from matplotlib.image import imread

                writer.add_image("ksm/scores", imread(png)[..., :3], global_step=step, dataformats="HWC")
        elif name == "WandbLogger":
            rows = [[t, task, float(s)] for t in report.target_names for task, s in report.ranked(target=t)]
            logger.log_table(key="ksm/scores", columns=["target", "task", "score"], data=rows, step=step)
    except Exception as exc:
        warnings.warn(f"TaskAttribution: could not log a figure/table to {name}: {exc}", stacklevel=2)


def _tolist(task_ids):
    return task_ids.tolist() if isinstance(task_ids, torch.Tensor) else list(task_ids)


def _take(inputs, sl):
    if isinstance(inputs, torch.Tensor):
        return inputs[sl]
    if isinstance(inputs, dict):
        return {k: _take(v, sl) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_take(v, sl) for v in inputs)
    return inputs


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
