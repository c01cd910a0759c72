"""The Lightning callback ``TaskAttribution``: it decides WHEN the engine runs and WHERE files go.

Lifecycle during ``trainer.fit``:

1. construction: every setting is checked (:mod:`lightning_ksm.config`); a bad one raises here.
2. ``setup``: resolve the output directory (like ``ModelCheckpoint`` resolves ``dirpath``).
3. ``on_train_start``: snapshot W0 (default; a NaN or inf weight is refused by name) and probe the
   first source and target batches (task ids readable, the output mode fits the model, gradients
   finite) and the settings that depend on the number of tasks. Bad input fails here, before any step.
4. first real validation epoch after the snapshot (never the sanity check), or at the end of fit:
   the :class:`~lightning_ksm.harvesting.runner.HarvestRunner` harvests per-sample outputs and
   projected Jacobians at W0 into the feature store, sharded across DDP ranks. The model, its
   optimizer, RNG states and logged metrics are untouched (W0 is evaluated functionally). A harvest
   that cannot write its files warns and training goes on (:mod:`.harvest_step`).
5. ``on_fit_end``: rank 0 runs the analysis (:func:`lightning_ksm.analysis.analyze_store`), writes
   the report and logs its scores to every logger. If the analysis fails, the harvest and the model
   are kept and the warning says how to rerun it (``lightning-ksm analyze DIR``).

The class here is namespace-independent; ``lightning_ksm.TaskAttribution`` (``lightning.pytorch``)
and ``lightning_ksm.pl.TaskAttribution`` (``pytorch_lightning``) mix it with their ``Callback``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence, Union

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..config import AnalysisConfig, HarvestConfig
from ..harvesting.batches import BatchReader
from ..harvesting.params import select_parameters
from ..harvesting.runner import HarvestRunner
from .base import AttributionCallbackBase
from .inputs import callback_warnings, check_data, check_settings, enabled, named_plan
from .snapshot import MissingSnapshotError, check_finite_w0, checkpoint_weights, find_w0, parse_snapshot, weights_from_file
from .run_record import RunRecorder, record_run_end
from .ranks import check_same_data, on_all_ranks
from .harvest_step import run_harvest, warn_unfinished

__all__ = ["TaskAttributionMixin"]

_HARVEST_FIELDS = {f.name for f in dataclasses.fields(HarvestConfig)}
_ANALYSIS_FIELDS = {f.name for f in dataclasses.fields(AnalysisConfig)}


def _with_overrides(cls, base, overrides: dict, name: str):
    """``base`` (an instance, a dict or None) with the flat keyword arguments that were given."""
    config = cls.coerce(base, name=name)
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


class TaskAttributionMixin(AttributionCallbackBase):
    """Task attribution from one training run (namespace-independent core; see the module docs).

    Args:
        harvest: a :class:`~lightning_ksm.config.HarvestConfig` (or a dict of its fields): output
            mode, projection, parameters, storage.
        analysis: an :class:`~lightning_ksm.config.AnalysisConfig` (or a dict): subsets, GradEx,
            surrogate, readouts.
        output, sequence_labels, projection, proj_dim, ..., n_subsets, subset_p, ..., threads: every
            setting of both objects as a flat keyword argument (convenient in code and LightningCLI
            YAML); one given here overrides the same field of ``harvest=`` / ``analysis=``. None: that
            object's value (the default). Each one's meaning, default and range: ``docs/callback.md``.
        task_key, input_key, label_key: how to read task ids, model inputs and labels from a batch:
            a dict key, a tuple position, or a callable ``fn(batch)``. Defaults: positions 2 / 0 / 1
            of tuple batches; keys "task" / "x" / "y" (and common synonyms) of dict batches; a dict
            batch with ``input_ids`` (Hugging Face) gives its model inputs as keywords.
        source: the source (training) data: ``"train"`` (the trainer's train dataloader) or a ``DataLoader``.
        target: the target data: ``"val"`` (every validation dataloader) or a ``DataLoader`` or a
            list of them. Target groups are the task ids found there, plus "all".
        snapshot: when to take W0: ``"fit_start"`` (default), ``"epoch:N"`` (at the start of epoch N),
            or a path to a Lightning checkpoint whose ``state_dict`` holds W0.
        forward_fn: ``fn(module, inputs) -> outputs``; default ``module(inputs)``, or
            ``module(**inputs)`` for HF inputs; a ``ModelOutput`` is read at ``.logits``.
        task_names: the source task ids, if known; otherwise the source data's task ids are scanned
            once (without the model) at train start.
        dirpath: output directory; default ``<logger log dir>/ksm`` or ``<default_root_dir>/ksm``.
            Two attribution callbacks in one Trainer need two output directories.
        progress: show progress bars for the harvest and GradEx.
        raise_on_analysis_error: re-raise an analysis failure instead of warning (the harvest is
            kept either way).
        overwrite: a fresh (not resumed) run whose output directory already holds an earlier run's
            harvest fails at train start unless this is True, in which case the old harvest, W0 and
            report are deleted first. Resuming from a checkpoint reuses the harvest on purpose.

    After ``fit``, ``callback.report`` holds the :class:`AttributionReport` (rank 0) and
    ``callback.report_dir`` its directory; ``callback.harvest_error`` the error of a harvest that
    could not write its files (training went on; no report, see ``docs/callback.md``).
    """

    def __init__(
        self,
        *,
        harvest: Union[HarvestConfig, dict, None] = None,
        analysis: Union[AnalysisConfig, dict, None] = None,
        task_key: Union[str, int, Callable, None] = None,
        input_key: Union[str, int, Callable, None] = None,
        label_key: Union[str, int, Callable, None] = None,
        source: Any = "train",
        target: Any = "val",
        snapshot: str = "fit_start",
        forward_fn: Optional[Callable] = None,
        task_names: Optional[Sequence] = None,
        dirpath: Optional[str] = None,
        progress: bool = True,
        raise_on_analysis_error: bool = False,
        overwrite: bool = False,
        # flat harvest settings (HarvestConfig)
        output: Union[str, Callable, None] = None,
        projection: Optional[str] = None,
        proj_dim: Optional[int] = None,
        proj_draws: Optional[int] = None,
        proj_seed: Optional[int] = None,
        grad_engine: Optional[str] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        chunk_size: Optional[int] = None,
        harvest_batch_size: Optional[int] = None,
        jacobian_dtype: Optional[str] = None,
        precondition: Optional[str] = None,
        exact_readout: Optional[int] = None,
        sequence_labels: Optional[str] = None,
        # flat analysis settings (AnalysisConfig)
        n_subsets: Optional[int] = None,
        subset_p: Optional[float] = None,
        subset_size: Optional[int] = None,
        seed: Optional[int] = None,
        estimator: Optional[str] = None,
        simulate_adam: Optional[str] = None, simulate_batches: Optional[str] = None, simulate_batch_orders: Optional[int] = None,
        target_readout: Optional[str] = None,
        calibrate: Optional[str] = None,
        lam: Optional[float] = None,
        loss: Optional[str] = None,
        weighting: Optional[str] = None,
        kernel: Optional[str] = None,
        gamma: Optional[float] = None,
        alpha: Optional[float] = None,
        holdout: Optional[float] = None,
        ensemble_samples: Optional[int] = None,
        n_groups: Optional[int] = None,
        best_subset_size: Optional[int] = None,
        max_exact: Optional[int] = None,
        support: Optional[str] = None,
        support_radius: Optional[int] = None,
        rescore_top: Optional[int] = None,
        rescore_budget: Optional[float] = None,
        max_exact_groupings: Optional[int] = None,
        n_bootstrap: Optional[int] = None,
        interval_level: Optional[float] = None,
        selection: Optional[str] = None,
        threads: Optional[int] = None,
    ) -> None:
        super().__init__(dirpath=dirpath, raise_on_analysis_error=raise_on_analysis_error)
        flat = dict(locals())
        self.harvest = _with_overrides(HarvestConfig, harvest, {k: flat[k] for k in _HARVEST_FIELDS}, "harvest")
        self.analysis = _with_overrides(AnalysisConfig, analysis, {k: flat[k] for k in _ANALYSIS_FIELDS}, "analysis")
        self.task_names = list(task_names) if task_names is not None else None
        # Every setting fails here, not after training (those bounded by K once K is known).
        check_settings(self.harvest, self.analysis, self.task_names)
        self.reader = BatchReader(input_key=input_key, label_key=label_key, task_key=task_key)
        if not (isinstance(source, str) and source == "train") and not hasattr(source, "dataset"):
            raise ValueError(f"source must be 'train' or a DataLoader, got {source!r}")
        if isinstance(target, str) and target != "val":
            raise ValueError(f"target must be 'val', a DataLoader or a list of DataLoaders, got {target!r}")
        self.source, self.target = source, target
        self.snapshot = snapshot
        self._snapshot_epoch = self._parse_snapshot(snapshot)
        self.forward_fn = forward_fn
        self.progress, self.overwrite = progress, overwrite
        self.harvest_complete = False
        self.harvest_error: Optional[BaseException] = None  # a failed read/write: retried once at fit end
        self.shards_computed = 0  # shards harvested by this process (resume tests read it)
        self._w0: Optional[dict] = None
        self._param_names: Optional[list] = None
        self._checked = False
        self.run_recorder = RunRecorder()  # the watched run (docs/gradex.md)

    # Read-only views of the harvest settings under their familiar names.
    output = property(lambda self: self.harvest.output)
    projection = property(lambda self: self.harvest.projection)
    proj_dim = property(lambda self: self.harvest.proj_dim)
    proj_seed = property(lambda self: self.harvest.proj_seed)
    include = property(lambda self: self.harvest.include)
    exclude = property(lambda self: self.harvest.exclude)

    _parse_snapshot = staticmethod(parse_snapshot)
    _enabled = staticmethod(enabled)  # not under fast_dev_run

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._enabled(trainer, warn=True):
            self._resolve_output(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled(trainer):
            return
        self._param_names = select_parameters(pl_module, include=self.include, exclude=self.exclude)
        if not self._resumed:
            self._guard_stale_output(trainer)
        if self._resumed and (self.w0_path is not None or self._snapshot_epoch in (0, None)):
            self._reload_w0(trainer)  # found by its identity, never re-taken from trained weights
        elif self._snapshot_epoch is None:
            self._take_snapshot(trainer, pl_module, checkpoint_weights(self.snapshot, pl_module, self._param_names))
        elif self._snapshot_epoch == 0:
            self._take_snapshot(trainer, pl_module)
        if not self._checked:
            self._check_first_batches(trainer, pl_module)
            self._checked = True
        self.run_recorder.start(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._enabled(trainer) and self._w0 is None and self._snapshot_epoch == trainer.current_epoch:
            self._take_snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._enabled(trainer):  # fast_dev_run: on_train_start did not start the recorder
            self.run_recorder.after_batch(trainer, outputs, batch_idx, batch, self.reader)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # The first real validation of fit after the snapshot (inside fit, trainer.training is False
        # during validation; trainer.validate() runs are not fit).
        if not self._enabled(trainer) or trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit":
            return
        if self._w0 is not None and not self.harvest_complete and self.harvest_error is None:
            run_harvest(self, trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._enabled(trainer):
            return
        if not self.harvest_complete and self._w0 is None and self._resumed and self.w0_path is not None:
            self._reload_w0(trainer)  # resumed after the last epoch: on_train_start did not run
        if not self.harvest_complete and self._w0 is None:
            rank_zero_warn(f"TaskAttribution: no W0 snapshot was taken (snapshot={self.snapshot!r} never came); "
                           "nothing to analyse")
            return
        if not self.harvest_complete:  # not run yet, or its files failed (space may have been freed since)
            run_harvest(self, trainer, pl_module, last_try=True)
        try:  # the run record is optional: it never costs the analysis
            record_run_end(self, trainer, pl_module)
        except Exception as exc:  # noqa: BLE001
            rank_zero_warn(f"TaskAttribution: could not record the run ({type(exc).__name__}: {exc})")
        if not self.harvest_complete:  # no report from an incomplete harvest: say how to finish it
            warn_unfinished(self, trainer)
            return
        from ..analysis import analyze_store

        self._finish(
            trainer,
            lambda: self._analyze(analyze_store, trainer),
            rerun_hint=(f"The harvest is kept in {self.harvest_dir}; rerun the analysis with "
                        f"`lightning-ksm analyze {self.harvest_dir}` (or lightning_ksm.analyze_store)."),
        )

    def _extra_state(self) -> dict:
        return {"harvest_complete": self.harvest_complete, "run_record": self.run_recorder.state_dict()}

    def _load_extra_state(self, state_dict: dict) -> None:
        self.harvest_complete = bool(state_dict.get("harvest_complete", False))
        self.run_recorder.load_state_dict(state_dict.get("run_record"))  # a resumed run records the whole run

    def _guard_stale_output(self, trainer) -> None:
        """A fresh run must not mix its features with an earlier run's harvest in the same directory.

        Rank 0 decides and broadcasts, and every rank waits here, so no rank can see the snapshot
        this run is about to write as a stale one.
        """
        world = trainer.world_size
        stale = on_all_ranks(lambda: self.run_dir.earlier_run() if trainer.is_global_zero else None,
                             what="looking for an earlier run", world=world)
        stale = trainer.strategy.broadcast(stale)
        if stale and not self.overwrite:
            raise ValueError(
                f"TaskAttribution output directory {self.output_dir} already holds an earlier run's "
                f"{' and '.join(stale)}. Give this run its own dirpath, resume the earlier run from its "
                "checkpoint (trainer.fit(..., ckpt_path=...)), or pass overwrite=True to delete the old "
                "harvest, W0 and report"
            )
        if stale and trainer.is_global_zero:
            rank_zero_warn(f"TaskAttribution: overwrite=True, deleting the earlier harvest in {self.output_dir}")
        on_all_ranks(lambda: self.run_dir.clear() if stale and trainer.is_global_zero else None,
                     what="deleting the earlier run", world=world)

    # -- snapshot -------------------------------------------------------------------------------
    def _take_snapshot(self, trainer, pl_module, state: Optional[dict] = None) -> None:
        """W0 = the model's weights now (or ``state``, from snapshot=<checkpoint>), saved to w0.pt."""
        if state is None:
            state = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters()}
            state.update({n: b.detach().to("cpu", copy=True) for n, b in pl_module.named_buffers()})
        check_finite_w0(state, self._param_names, self.snapshot)  # before w0.pt and the first step
        self._w0 = state
        self._save_w0(trainer, state)

    def _reload_w0(self, trainer) -> None:
        if self.w0_path is None:
            raise MissingSnapshotError("TaskAttribution: the checkpoint's callback state records no W0 snapshot; "
                                       "it was not taken by this callback. Start a new run")
        here = [self.w0_path, self.run_dir.w0 if self.output_dir else None,
                os.path.join(os.path.abspath(self.dirpath), "w0.pt") if self.dirpath is not None else None]
        self.w0_path = on_all_ranks(lambda: os.path.abspath(find_w0(here, self.w0_sha256)), what="finding W0",
                                    world=trainer.world_size)  # on every rank: one may not see the file
        self._w0 = on_all_ranks(lambda: weights_from_file(self.w0_path), what="reading W0", world=trainer.world_size)

    # -- data -----------------------------------------------------------------------------------
    def _plan(self, trainer) -> list:
        """``[(split, loader), ...]``: the source loaders, then the target loaders."""
        return [entry[:2] for entry in named_plan(self, trainer)]

    def _harvest_plan(self, trainer) -> list:
        """``[(split, loader, description, reader), ...]``, as the harvest runner reads them."""
        return named_plan(self, trainer)

    def _show_progress(self, trainer) -> bool:
        """Progress bars only when asked for and the Trainer shows its own (enable_progress_bar)."""
        return bool(self.progress and trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None))

    def _runner(self, trainer, pl_module, weights=None, preconditioner=None) -> HarvestRunner:
        return HarvestRunner(
            pl_module, self.harvest_dir, config=self.harvest, reader=self.reader, weights=weights,
            forward_fn=self.forward_fn, rank=trainer.global_rank, world=trainer.world_size,
            progress=self._show_progress(trainer), meta={"w0_path": self.w0_path, "w0_sha256": self.w0_sha256},
            preconditioner=preconditioner,
        )

    def _check_first_batches(self, trainer, pl_module) -> None:
        """Before the first step, on every rank: the first batches through the model (probe), then every
        sample; then the ranks compare their batch counts and what they read (:mod:`.ranks`)."""
        def check():
            plan = self._harvest_plan(trainer)
            scan = check_data(self, plan, self._runner(trainer, pl_module).probe(plan))
            self.analysis.validate(len(set(scan["source_tasks"])))  # settings bounded by K, before the first step
            return scan["fingerprints"]

        check_same_data(trainer, on_all_ranks(check, what="the check at train start", world=trainer.world_size))

    def _analyze(self, analyze_store, trainer):
        with callback_warnings():
            return analyze_store(self.harvest_dir, self.analysis, progress=self._show_progress(trainer),
                                 timings=self.timings, extra_config=self._config_record())

    def _config_record(self) -> dict:
        return {"callback": {"snapshot": self.snapshot, **self.harvest.record()},
                "projection_seed": self.proj_seed, "run": self.run_recorder.record()}
