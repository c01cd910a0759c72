"""The record of the training run the callback watches: what GradEx's ``simulate`` estimator follows.

:class:`RunRecorder` reads, from the trainer it is given (no Lightning import here):

- at train start: the optimizer's type and hyperparameters (lr, betas, eps, weight decay, momentum,
  dampening, Nesterov, amsgrad) of its first parameter group, the learning-rate schedulers'
  class names and intervals, ``max_steps`` / ``max_epochs``, gradient accumulation, the train
  loader's batch size and number of samples;
- after every training batch: the learning rate of the step just taken (the lr schedule);
- at the end: the optimizer steps and epochs really run, whether the run was epoch-based (no
  ``max_steps``: a subset with less data gets fewer steps), the real all-tasks outcome (the mean
  loss on every target loader after training, per target task and ``"all"``) and the real weight
  displacement ``|W_T - W0|`` over the linearized parameters (one pass over the parameters).

The record is JSON-able; the callback stores it in the report's config (``config["run"]``) and in
``<run dir>/run.json``. These are the free ground-truth points of the watched run: none needs
retraining.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

from .ranks import gather, on_all_ranks

__all__ = ["RunRecorder", "optimizer_record", "final_target_losses", "weight_displacement", "record_run_end"]

_HYPER = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "maximize")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return repr(value)


def optimizer_record(optimizer) -> dict:
    """``{"type": "AdamW", "lr": ..., "betas": [...], ...}`` from the first parameter group."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wrapper
    group = inner.param_groups[0] if inner.param_groups else {}
    rec = {"type": type(inner).__name__, "n_param_groups": len(inner.param_groups)}
    for key in _HYPER:
        if key in group:
            rec[key] = _plain(group[key])
    if "initial_lr" in group:
        rec["initial_lr"] = _plain(group["initial_lr"])
    return rec


def _loader_info(loader) -> dict:
    info = {}
    batch = getattr(loader, "batch_size", None)
    if batch is None and getattr(loader, "batch_sampler", None) is not None:
        batch = getattr(loader.batch_sampler, "batch_size", None)
    if batch is not None:
        info["batch_size"] = int(batch)
    try:
        info["n_train_samples"] = int(len(loader.dataset))
    except (TypeError, AttributeError):
        pass
    return info


def _scheduler_info(trainer) -> list:
    out = []
    for cfg in getattr(trainer, "lr_scheduler_configs", None) or []:
        sched = getattr(cfg, "scheduler", cfg)
        out.append({"type": type(sched).__name__, "interval": getattr(cfg, "interval", None),
                    "frequency": getattr(cfg, "frequency", None)})
    return out


@torch.no_grad()
def weight_displacement(module: torch.nn.Module, w0: Mapping[str, torch.Tensor],
                        names: Optional[Sequence[str]] = None) -> float:
    """``|W - W0|`` (Euclidean, float64) over ``names`` (default: the parameters found in ``w0``)."""
    params = dict(module.named_parameters())
    total = 0.0
    for name in names if names is not None else [n for n in params if n in w0]:
        diff = params[name].detach().to("cpu", torch.float64) - w0[name].to(torch.float64)
        total += float((diff * diff).sum())
    return math.sqrt(total)


def _loss_per_sample(outputs: torch.Tensor, labels: torch.Tensor, output_mode: str) -> torch.Tensor:
    if output_mode == "regression":
        return 0.5 * (outputs.reshape(len(labels), -1).float() - labels.reshape(len(labels), -1).float()).pow(2).sum(1)
    if output_mode == "logistic":
        return torch.nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1).float(), labels.reshape(-1).float(), reduction="none")
    return torch.nn.functional.cross_entropy(outputs.float(), labels.long(), reduction="none")


@torch.no_grad()
def final_target_losses(module, loaders, reader, *, forward_fn=None, output_mode: str = "margin",
                        device=None, world: Optional[int] = None) -> dict:
    """Mean loss of ``module`` on the target loaders, per target task id and ``"all"`` (the loss
    GradEx models: cross-entropy for margin / logits, squared error, binary cross-entropy), added
    over the DDP ranks (``world``: the trainer's world size; None: the process group's)."""
    from ..harvesting.batches import to_device

    was_training = module.training
    module.eval()
    device = device or next(module.parameters()).device

    def local_sums():  # this rank's share
        sums: dict = {}
        counts: dict = {}
        total, n_total = 0.0, 0
        for loader in loaders:
            for batch in loader:
                inputs, labels, tasks = reader.read(batch)
                inputs = to_device(inputs, device)
                out = forward_fn(module, inputs) if forward_fn is not None else module(inputs)
                losses = _loss_per_sample(out, labels.to(out.device), output_mode).double().cpu()
                task_list = tasks.tolist() if isinstance(tasks, torch.Tensor) else list(tasks)
                for value, task in zip(losses.tolist(), task_list):
                    key = str(task)
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                total += float(losses.sum())
                n_total += len(losses)
        sums["all"], counts["all"] = total, n_total
        return sums, counts

    try:  # every rank enters the collectives, even when one of them failed
        sums, counts = on_all_ranks(local_sums, what="the final target losses", world=world)
    finally:
        module.train(was_training)
    return _means(*_across_ranks(sums, counts, world))


def _across_ranks(sums: dict, counts: dict, world: Optional[int] = None):
    """Sums and counts added over the DDP ranks (each may have read its own share of the data)."""
    parts = gather((sums, counts), world)
    total_s: dict = {}
    total_c: dict = {}
    for s, c in parts:
        for key in s:
            total_s[key] = total_s.get(key, 0.0) + s[key]
            total_c[key] = total_c.get(key, 0) + c[key]
    return total_s, total_c


def _means(sums: dict, counts: dict) -> dict:
    return {key: sums[key] / max(counts[key], 1) for key in sums}


class RunRecorder:
    """Collects the record of one ``trainer.fit`` (see the module docs); :meth:`record` returns it."""

    def __init__(self) -> None:
        self._rec: dict = {}
        self.lr_schedule: list = []
        self._opt = None  # set by start(); a recorder finished without it records no optimizer

    def start(self, trainer) -> None:
        opts = list(getattr(trainer, "optimizers", None) or [])
        rec = {"optimizer": optimizer_record(opts[0]) if opts else None, "n_optimizers": len(opts)}
        max_steps = getattr(trainer, "max_steps", -1)
        rec["max_steps"] = None if max_steps in (None, -1) else int(max_steps)
        max_epochs = getattr(trainer, "max_epochs", None)
        rec["max_epochs"] = None if max_epochs in (None, -1) else int(max_epochs)
        rec["accumulate_grad_batches"] = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        rec["lr_schedulers"] = _scheduler_info(trainer)
        loader = getattr(trainer, "train_dataloader", None)
        if loader is not None:
            rec.update(_loader_info(loader))
        self._rec = rec
        self.lr_schedule = []
        self._opt = opts[0] if opts else None

    def after_batch(self, trainer) -> None:
        """Record the lr of the optimizer step just taken (once per optimizer step)."""
        if self._opt is None:
            return
        step = int(getattr(trainer, "global_step", 0))
        if step > len(self.lr_schedule):
            inner = getattr(self._opt, "optimizer", self._opt)
            lr = float(inner.param_groups[0]["lr"])
            self.lr_schedule.extend([lr] * (step - len(self.lr_schedule)))

    def finish(self, trainer, *, displacement: Optional[float] = None, final_losses: Optional[dict] = None) -> None:
        rec = self._rec
        rec["steps"] = int(getattr(trainer, "global_step", 0))
        rec["epochs"] = int(getattr(trainer, "current_epoch", 0))
        # Epoch-based: training ran by epochs (no max_steps), so a subset with less data gets fewer steps.
        rec["epoch_based"] = rec.get("max_steps") is None
        rec["lr_schedule"] = list(self.lr_schedule[: rec["steps"]]) or None
        if displacement is not None:
            rec["displacement"] = float(displacement)
        if final_losses is not None:
            rec["final_losses"] = {str(k): float(v) for k, v in final_losses.items()}
            rec["final_loss"] = float(final_losses.get("all", float("nan")))
        opt = getattr(self._opt, "optimizer", self._opt)
        if opt is not None and rec.get("optimizer") is not None:
            rec["optimizer"]["final_lr"] = float(opt.param_groups[0]["lr"])
            rec["optimizer_state_keys"] = sorted({k for st in opt.state.values() for k in st})

    def record(self) -> dict:
        return dict(self._rec)


def record_run_end(callback, trainer, pl_module) -> Optional[dict]:
    """At fit end, for a :class:`~lightning_ksm.callbacks.task_attribution.TaskAttributionMixin`:
    finish its ``run_recorder`` with the real displacement and all-tasks target losses, and write
    ``<run dir>/run.json`` (rank 0). A failure here warns and never loses the run."""
    import os

    from lightning_utilities.core.rank_zero import rank_zero_warn

    from ..fileio import atomic_write_json

    recorder = callback.run_recorder
    try:
        disp = weight_displacement(pl_module, callback._w0, callback._param_names) if callback._w0 else None
        targets = [dl for split, dl in callback._plan(trainer) if split == "target"]
        losses = final_target_losses(pl_module, targets, callback.reader, forward_fn=callback.forward_fn,
                                     output_mode=callback.harvest.output_name, world=trainer.world_size)
        recorder.finish(trainer, displacement=disp, final_losses=losses)
    except Exception as exc:  # noqa: BLE001 - the record is optional; the analysis still runs
        recorder.finish(trainer)
        rank_zero_warn(f"TaskAttribution: could not record the run's final outcome ({exc})")
    rec = recorder.record()
    if trainer.is_global_zero and callback.output_dir is not None:
        os.makedirs(callback.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(callback.output_dir, "run.json"), rec)
    return rec
