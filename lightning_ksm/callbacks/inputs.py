"""The supervised callback's data: the named plan of loaders (source, then target), the whole-data
check at train start, the analysis warnings rephrased in the callback's own settings, and the one
run it skips (``fast_dev_run``)."""

from __future__ import annotations

import contextlib
import warnings

from lightning_utilities.core.rank_zero import rank_zero_warn

from ..harvesting.batches import as_loader_list
from ..harvesting.scan import check_label_range, scan_data, with_group_readers

__all__ = ["check_settings", "named_plan", "check_data", "callback_warnings", "enabled"]


def enabled(trainer, *, warn: bool = False) -> bool:
    """False under ``fast_dev_run`` (``warn``: say so, once per fit, from rank zero)."""
    if not getattr(trainer, "fast_dev_run", False):
        return True
    if warn:
        rank_zero_warn("TaskAttribution does nothing under fast_dev_run: a smoke test of a few batches is too "
                       "short to take W0, harvest and analyse (and Lightning turns off loggers and checkpoints); "
                       "train without fast_dev_run to get the attribution report")
    return False


def _named(loaders, split: str, prefix: str, what: str) -> list:
    """``[(split, loader, description, group name)]``: dict keys name the loaders, else prefix[_i]."""
    if isinstance(loaders, dict):
        names = [str(k) for k in loaders]
    else:
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        names = [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]
    return [(split, dl, f"{what} {name!r}", name) for dl, name in zip(as_loader_list(loaders, split), names)]


def named_plan(cb, trainer) -> list:
    """Plan entries ``(split, loader, description, reader)``: the source loaders, then the target ones.
    A target loader whose batches carry no task ids is one target group named after the loader."""
    if isinstance(cb.source, str):
        source = trainer.train_dataloader
        if source is None:
            raise ValueError("TaskAttribution(source='train') found no train dataloader")
        entries = _named(source, "source", "train", "training loader")
    else:
        entries = _named(cb.source, "source", "source", "source loader")
    if isinstance(cb.target, str):
        target = trainer.val_dataloaders
        if target is None:  # e.g. a resumed fit whose loop is already done: set the loaders up
            with contextlib.suppress(Exception):
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                target = trainer.val_dataloaders
        if getattr(trainer, "limit_val_batches", None) == 0:
            raise ValueError(
                "TaskAttribution(target='val') reads the target data from the validation dataloaders, and "
                "limit_val_batches=0 turns them off: set limit_val_batches > 0 (the harvest reads every "
                "validation sample either way), or give target= a DataLoader"
            )
        if target is None or (isinstance(target, (list, tuple, dict)) and not len(target)):
            raise ValueError(
                "TaskAttribution(target='val') needs validation data: define val_dataloader / pass "
                "val_dataloaders to fit, or give target= a DataLoader"
            )
        entries += _named(target, "target", "val", "validation loader")
    else:
        if isinstance(cb.target, (list, tuple, dict)) and not len(cb.target):
            raise ValueError("TaskAttribution(target=[]): the target list is empty; give at least one DataLoader")
        entries += _named(cb.target, "target", "target", "target loader")
    return with_group_readers(entries, cb.reader)


def check_data(cb, plan: list, n_classes) -> dict:
    """Every sample of ``plan`` read once (no model): ids, labels, inputs; returns the scan
    (:func:`~lightning_ksm.harvesting.scan.scan_data`: the source task ids, each loader's fingerprint)."""
    scan = scan_data(plan)
    tasks = scan["source_tasks"]
    if cb.task_names is not None:
        declared = {str(t) for t in cb.task_names}
        unknown = [t for t in tasks if str(t) not in declared]
        if unknown:
            raise ValueError(f"the source data has task ids {unknown[:10]} that are not in task_names={cb.task_names}")
        absent = [t for t in cb.task_names if str(t) not in {str(x) for x in tasks}]
        if absent:
            raise ValueError(f"task_names {absent[:10]} have no samples in the source data; every task needs samples")
    if len(set(tasks)) < 2:
        raise ValueError(
            f"task attribution needs at least 2 source tasks; the source data has task ids {list(tasks)} "
            "(check task_key, or that every task is in the training data)"
        )
    check_label_range(scan, cb.harvest.output_name, n_classes, cb.harvest.sequence_labels)
    return scan


@contextlib.contextmanager
def callback_warnings():
    """GradEx's convergence warning names solver options the callback does not have: say what the
    callback exposes instead (``lam``)."""
    from ..estimation.solver import GradExConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradExConvergenceWarning)
        yield
    for w in caught:
        if issubclass(w.category, GradExConvergenceWarning):
            text = str(w.message).split("; raise max_iter")[0]
            rank_zero_warn(f"{text}; raise lam (TaskAttribution(lam=...), `lightning-ksm analyze --lam`) to make the "
                           "problem better conditioned", category=GradExConvergenceWarning)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_settings(harvest, analysis, task_names) -> None:
    """Every setting, and the pairs that only fail together, at construction (never after training)."""
    harvest.validate()
    analysis.validate(len(set(task_names)) if task_names is not None else None)
    if callable(harvest.output) and analysis.loss is None:
        raise ValueError(
            "a callable output (output=fn, one scalar per sample) has no default GradEx loss: pass loss= one of "
            "'logistic' (the scalar is a log-odds against a 0/1 label) or 'squared' (a regression of the label); "
            "for a language model's token labels use output='sequence' instead")
    if callable(harvest.output) and analysis.loss == "cross_entropy":
        raise ValueError("loss='cross_entropy' needs a vector of logits per sample, but a callable output gives one "
                         "scalar per sample: pass loss='logistic' or 'squared'")
