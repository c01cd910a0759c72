"""What every attribution callback shares: the output directory, the W0 snapshot file, the resume
state, rank-zero writes, and the end-of-fit analysis that never loses the harvest or the model.

:class:`AttributionCallbackBase` uses only the trainer API common to ``lightning.pytorch`` and
``pytorch_lightning``; the concrete callbacks mix it with either namespace's ``Callback``.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable, Optional

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..fileio import WriteFailedError, atomic_torch_save, ensure_free_space, remove_temp_files
from ..rundir import RunDirectory
from .loggers import log_report
from .ranks import on_all_ranks

__all__ = ["AttributionCallbackBase", "STATE_VERSION"]

STATE_VERSION = 1


class AttributionCallbackBase:
    """Shared lifecycle pieces (see the module docstring). Subclasses call :meth:`_resolve_output`
    in ``setup``, :meth:`_save_w0` when they snapshot, and :meth:`_finish` at the end of fit."""

    _name = "TaskAttribution"

    def __init__(self, *, dirpath: Optional[str] = None, raise_on_analysis_error: bool = False) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.raise_on_analysis_error = bool(raise_on_analysis_error)
        # Run state (what state_dict saves: paths and progress, never arrays).
        self.output_dir: Optional[str] = None
        self.w0_path: Optional[str] = None  # absolute
        self.w0_sha256: Optional[str] = None  # what identifies W0 on resume
        self.report = None
        self.analysis_error: Optional[BaseException] = None
        self.timings: dict = {}
        self._resumed = False

    # -- where files go ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> Optional[RunDirectory]:
        return None if self.output_dir is None else RunDirectory(self.output_dir)

    @property
    def harvest_dir(self) -> Optional[str]:
        """Where the harvest (a :class:`~lightning_ksm.store.FeatureStore`) is written."""
        return None if self.output_dir is None else self.run_dir.harvest

    @property
    def report_dir(self) -> Optional[str]:
        """Where the :class:`~lightning_ksm.report.AttributionReport` is written."""
        return None if self.output_dir is None else self.run_dir.report

    def _default_dir(self, trainer) -> str:
        """``<first logger's log dir>/ksm``, or ``<default_root_dir>/ksm`` without a logger."""
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return RunDirectory.under(os.path.join(save_dir, str(logger.name), version)).root
        return RunDirectory.under(trainer.default_root_dir).root

    def _resolve_output(self, trainer) -> None:
        # Resolved in setup; a resumed run keeps its checkpoint's directory (load_state_dict runs
        # after setup), so nothing is created on disk yet.
        if self.output_dir is None:
            chosen = os.fspath(self.dirpath) if self.dirpath is not None else self._default_dir(trainer)
            # Absolute: a resumed run started from another working directory finds the same files.
            self.output_dir = trainer.strategy.broadcast(os.path.abspath(chosen))
        self._check_alone(trainer)

    def _check_alone(self, trainer) -> None:
        """Two attribution callbacks with one state key or one output directory would overwrite each
        other's W0, harvest, report and checkpoint state: refused before anything is written."""
        for other in trainer.callbacks:
            if other is self or not isinstance(other, AttributionCallbackBase):
                continue
            theirs = other.output_dir or os.path.abspath(
                os.fspath(other.dirpath) if other.dirpath is not None else other._default_dir(trainer))
            if other.state_key == self.state_key or os.path.normpath(theirs) == os.path.normpath(self.output_dir):
                raise ValueError(
                    f"this Trainer has two attribution callbacks ({self._name} and {other._name}) with the output "
                    f"directory {theirs} (dirpath={self.dirpath!r} and dirpath={other.dirpath!r}); they would "
                    "overwrite each other's files and checkpoint state: give each its own dirpath=..."
                )

    # -- checkpoint state -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Like ModelCheckpoint: two instances with other output directories keep separate states.
        return self._generate_state_key(dirpath=None if self.dirpath is None else os.fspath(self.dirpath))

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "output_dir": self.output_dir, "w0_path": self.w0_path,
                "w0_sha256": self.w0_sha256, **self._extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"{self._name}: the checkpoint's callback state has version {version!r}, this lightning-ksm "
                f"reads version {STATE_VERSION}; resume with the lightning-ksm that wrote it, or start a new run"
            )
        saved = state_dict.get("output_dir")
        if self.dirpath is not None and saved is not None and os.path.abspath(os.fspath(self.dirpath)) != os.path.abspath(saved):
            rank_zero_warn(
                f"{self._name}: resuming keeps the checkpoint's output directory {saved} (its W0 and harvest "
                f"belong to that run), not dirpath={os.fspath(self.dirpath)!r}"
            )
        self.output_dir = saved
        self.w0_path = state_dict.get("w0_path")
        self.w0_sha256 = state_dict.get("w0_sha256")
        self._load_extra_state(state_dict)
        self._resumed = True

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Resuming with another ``dirpath`` changes the ``state_key``, and Lightning would then treat
        this callback as new (and a new W0 would be taken from trained weights): adopt the one state
        of this callback type in the checkpoint instead (``load_state_dict`` warns about the dirpath)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__ + "{"
        mine = [v for k, v in states.items() if isinstance(k, str) and k.startswith(prefix) and isinstance(v, dict)]
        if len(mine) == 1:
            self.load_state_dict(mine[0])
        elif len(mine) > 1:
            rank_zero_warn(f"{self._name}: the checkpoint holds {len(mine)} {self._name} states and none has this "
                           f"callback's dirpath={self.dirpath!r}; pass the dirpath the run was started with")

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state_dict: dict) -> None:
        pass

    # -- W0 ---------------------------------------------------------------------------------------
    def _save_w0(self, trainer, state: Any) -> None:
        """Write W0 to ``<output_dir>/w0.pt`` from rank 0 (atomically, after a free-space check, with
        leftovers of earlier attempts removed) and record its SHA-256; every rank waits for it."""
        from .snapshot import file_sha256

        self.w0_path = os.path.abspath(self.run_dir.w0)

        def write():
            if not trainer.is_global_zero:
                return None
            os.makedirs(self.output_dir, exist_ok=True)
            remove_temp_files(self.w0_path)
            values = state.values() if isinstance(state, dict) else ()
            size = sum(t.numel() * t.element_size() for t in values if hasattr(t, "element_size"))
            try:
                ensure_free_space(self.output_dir, size, what="the W0 snapshot", kept="training has not started")
                atomic_torch_save(state, self.w0_path)
            except OSError as exc:
                if isinstance(exc, WriteFailedError):
                    raise
                raise WriteFailedError(exc.errno, f"{self._name}: the W0 snapshot could not be written to "
                                                  f"{self.w0_path} ({exc}); no partial file was left") from exc
            return file_sha256(self.w0_path)

        digest = on_all_ranks(write, what="writing the W0 snapshot", world=trainer.world_size)  # every rank waits
        self.w0_sha256 = trainer.strategy.broadcast(digest)

    # -- the end of fit ---------------------------------------------------------------------------
    def _finish(self, trainer, compute: Callable[[], Any], *, rerun_hint: str, figures: bool | str = "auto") -> None:
        """On rank 0: ``compute()`` the report, save it, log it; a failure warns (or raises with
        ``raise_on_analysis_error``, on every rank) and keeps everything already on disk. All ranks wait."""
        on_all_ranks(lambda: self._report(trainer, compute, rerun_hint, figures) if trainer.is_global_zero else None,
                     what=f"{self._name}'s analysis", world=trainer.world_size)

    def _report(self, trainer, compute: Callable[[], Any], rerun_hint: str, figures) -> None:
        """Rank 0's part of :meth:`_finish`."""
        try:
            report = compute()
            report.save(self.report_dir, figures=figures)
        except Exception as exc:  # keep the harvest and the trained model; say how to rerun
            self.analysis_error = exc
            message = (
                f"{self._name}: the post-training analysis failed ({type(exc).__name__}: {exc}). "
                f"{rerun_hint} The trained model is unaffected. Traceback:\n{traceback.format_exc()}"
            )
            if self.raise_on_analysis_error:
                raise RuntimeError(message) from exc
            rank_zero_warn(message)
        else:
            self.report = report
            log_report(trainer, report, self.report_dir)
            print(f"{self._name}: report written to {self.report_dir} (open report.html, or run "
                  f"`lightning-ksm show {self.output_dir}`)", flush=True)
