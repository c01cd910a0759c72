"""The supervised callback's harvest: every rank harvests its share of the chunks at W0 into the
run's feature store, and all ranks leave it the same way (:mod:`.ranks`).

A harvest that cannot read or write its files (a full disk, a quota, any ``OSError``, on any rank)
never ends the user's training: the ranks agree on it, rank zero warns, what is stored is kept (the
store is resumable: a later harvest skips every stored shard) and training goes on. The callback
tries once more at the end of fit (space may have been freed meanwhile); if that fails too, it
writes no report and says how to finish the harvest (:func:`warn_unfinished`). Any other failure
(data the train-start check could not see, a bug) raises on every rank.
"""

from __future__ import annotations

import os
import time

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..harvesting.readout import adam_preconditioner
from ..store import FeatureStore
from .ranks import is_io_failure, on_all_ranks

__all__ = ["run_harvest", "warn_unfinished"]

_WHAT = "the TaskAttribution harvest"


def run_harvest(cb, trainer, pl_module, *, last_try: bool = False) -> None:
    """Harvest W0's features into ``cb.harvest_dir`` on every rank: ``cb.harvest_complete`` once done,
    ``cb.harvest_error`` after a failed read or write (with a warning unless ``last_try``: then the
    end-of-fit message, :func:`warn_unfinished`, says it all); other failures raise."""
    start, world, runner = time.perf_counter(), trainer.world_size, None

    def prepare():
        # the watched optimizer's second moments as they are now (after the first epoch, usually)
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        scale = adam_preconditioner(optimizer, dict(pl_module.named_parameters()))
        made = cb._runner(trainer, pl_module, weights=cb._w0, preconditioner=scale)
        if trainer.is_global_zero:
            made.initialize_store()
        return made

    try:
        runner = on_all_ranks(prepare, what=_WHAT, world=world)  # the store exists before any rank writes
        on_all_ranks(lambda: runner.run(cb._harvest_plan(trainer)), what=_WHAT, world=world)
    except Exception as exc:
        if not is_io_failure(exc):
            raise
        cb.harvest_error = exc
        if trainer.is_global_zero and not last_try:
            rank_zero_warn(f"TaskAttribution: the harvest at W0 failed ({type(exc).__name__}: {exc}). Training "
                           f"goes on; {_stored(cb)} are kept. The callback tries once more at the end of fit (a "
                           "harvest skips every stored shard): free some space (or fix what the error names) meanwhile")
        return
    finally:
        if runner is not None:
            cb.shards_computed += runner.shards_computed
    cb.harvest_complete, cb.harvest_error = True, None
    cb.timings["harvest"] = time.perf_counter() - start


def warn_unfinished(cb, trainer) -> None:
    """The end-of-fit message of a harvest that failed again at the end of fit: no report, and how
    to finish it (resume from a checkpoint: the stored shards are skipped, the analysis follows)."""
    if not trainer.is_global_zero:
        return
    exc = cb.harvest_error
    last = _last_checkpoint(trainer)
    how = (f"resume this run from its last checkpoint, trainer.fit(model, ..., ckpt_path={last!r})" if last else
           "resume this run from a checkpoint saved after W0 was taken, trainer.fit(model, ..., ckpt_path=...) (this "
           "run saved none)")
    rank_zero_warn(
        f"TaskAttribution: no report was written: the harvest at W0 is incomplete ({type(exc).__name__}: {exc}). "
        f"The trained model is unaffected; W0 ({cb.w0_path}) and {_stored(cb)} are kept. To finish the harvest, free "
        f"some space (or fix what the error names), then {how}: the harvest computes only the missing shards "
        "and the analysis writes the report"
    )


def _stored(cb) -> str:
    """What the store holds, for the messages (never raises: the disk may be in any state)."""
    try:
        splits = FeatureStore(cb.harvest_dir).completeness()["splits"]
        held = ", ".join(f"{v['stored_shards']} of {v['expected_shards']} {split} shards"
                         for split, v in splits.items())
    except Exception:  # noqa: BLE001 - a message must not fail
        held = ""
    return f"the shards stored so far in {cb.harvest_dir}" + (f" ({held})" if held else "")


def _last_checkpoint(trainer):
    """The newest checkpoint file the trainer's ModelCheckpoint callbacks saved in this fit, or None."""
    paths = {getattr(c, name, "") for c in getattr(trainer, "checkpoint_callbacks", []) or []
             for name in ("last_model_path", "best_model_path")}
    found = [p for p in paths if p and os.path.exists(p)]
    return max(found, key=os.path.getmtime) if found else None
