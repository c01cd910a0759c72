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

A run that diverged (a non-finite trained weight among the linearized parameters, or a non-finite
final target loss) records ``diverged``: the epoch and batch where the training loss was first not
finite, the parameters and target columns that are not; its final losses and displacement are left
out (there is no outcome to calibrate with). The analysis then does not simulate it and its report
says so first (``estimation.select``, ``estimation.checks.diverged_run_notes``).

The record is JSON-able; the callback stores it in the report's config (``config["run"]``) and in
``<run dir>/run.json``. These are the free ground-truth points of the watched run: none needs
retraining.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

__all__ = ["RunRecorder", "optimizer_record", "final_target_losses", "weight_displacement", "nonfinite_parameters",
           "record_run_end"]

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


@torch.no_grad()
def nonfinite_parameters(module: torch.nn.Module, names: Optional[Sequence[str]] = None) -> list:
    """The names (among ``names``, default all) of ``module``'s parameters that hold a NaN or inf."""
    params = dict(module.named_parameters())
    return [n for n in (names if names is not None else params) if not bool(torch.isfinite(params[n]).all())]


class _FirstNonFiniteLoss:
    """Where the training loss (what ``training_step`` returned: a tensor or a dict with "loss") was
    first NaN or inf. Checked on the loss's device and read once at the end: no sync per step."""

    def __init__(self) -> None:
        self._seen = 0  # batches watched
        self._offsets: dict = {}  # epoch -> batches watched before its batch 0
        self._first: Optional[torch.Tensor] = None  # the first bad batch's number; -1 while none

    def update(self, outputs, epoch: int, batch_idx: Optional[int]) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        self._offsets.setdefault(epoch, self._seen - int(batch_idx or 0))
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach().reshape(()))
        self._first = self._first.masked_fill(bad & (self._first < 0), self._seen)
        self._seen += 1

    def result(self) -> Optional[dict]:
        """``{"epoch", "batch"}`` of the first non-finite training loss, or None."""
        first = -1 if self._first is None else int(self._first)
        if first < 0:
            return None
        epoch = max(e for e, offset in self._offsets.items() if offset <= first)
        return {"epoch": epoch, "batch": first - self._offsets[epoch]}


def _loss_per_sample(outputs: torch.Tensor, labels: torch.Tensor, output_mode: str) -> torch.Tensor:
    if output_mode == "regression":
        return 0.5 * (outputs.reshape(len(labels), -1).float() - labels.reshape(len(labels), -1).float()).pow(2).sum(1)
    if output_mode == "logistic":
        return torch.nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1).float(), labels.reshape(-1).float(), reduction="none")
    return torch.nn.functional.cross_entropy(outputs.float(), labels.long(), reduction="none")


@torch.no_grad()
def final_target_losses(module, loaders, reader, *, forward_fn=None, output_mode: str = "margin",
                        device=None) -> dict:
    """Mean loss of ``module`` on the target loaders, per target task id and ``"all"`` (the loss
    GradEx models: cross-entropy for margin / logits, squared error, binary cross-entropy)."""
    from ..harvesting.batches import to_device

    was_training = module.training
    module.eval()
    device = device or next(module.parameters()).device
    sums: dict = {}
    counts: dict = {}
    total, n_total = 0.0, 0
    try:
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
    finally:
        module.train(was_training)
    sums["all"], counts["all"] = total, n_total
    return _means(*_across_ranks(sums, counts))


def _across_ranks(sums: dict, counts: dict):
    """Sums and counts added over the DDP ranks (each may have read its own share of the data)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (sums, counts))
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
        self._nonfinite_loss = _FirstNonFiniteLoss()

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
        self._nonfinite_loss = _FirstNonFiniteLoss()

    def after_batch(self, trainer, outputs=None, batch_idx: Optional[int] = None) -> None:
        """Record the lr of the optimizer step just taken (once per optimizer step), and the epoch and
        batch where the training loss (``outputs``, what ``training_step`` returned) was first not finite."""
        self._nonfinite_loss.update(outputs, int(getattr(trainer, "current_epoch", 0)), batch_idx)
        if self._opt is None:
            return
        step = int(getattr(trainer, "global_step", 0))
        if step > len(self.lr_schedule):
            inner = getattr(self._opt, "optimizer", self._opt)
            lr = float(inner.param_groups[0]["lr"])
            self.lr_schedule.extend([lr] * (step - len(self.lr_schedule)))

    def finish(self, trainer, *, displacement: Optional[float] = None, final_losses: Optional[dict] = None,
               nonfinite_params: Sequence[str] = ()) -> None:
        """The end of the run. A non-finite parameter, final loss or displacement records the run as
        ``diverged`` (see the module docs) instead of recording numbers no analysis can use."""
        rec = self._rec
        bad_losses = sorted(str(k) for k, v in (final_losses or {}).items() if not math.isfinite(float(v)))
        if nonfinite_params or bad_losses or (displacement is not None and not math.isfinite(displacement)):
            rec["diverged"] = {"first_nonfinite_loss": self._nonfinite_loss.result(),
                               "nonfinite_params": list(nonfinite_params), "nonfinite_final_losses": bad_losses}
            displacement, final_losses = None, None  # no outcome: nothing to calibrate with
        else:
            rec["diverged"] = None
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
                                     output_mode=callback.harvest.output_name)
        recorder.finish(trainer, displacement=disp, final_losses=losses,
                        nonfinite_params=nonfinite_parameters(pl_module, callback._param_names))
    except Exception as exc:  # noqa: BLE001 - the record is optional; the analysis still runs
        recorder.finish(trainer)
        rank_zero_warn(f"TaskAttribution: could not record the run's final outcome ({exc})")
    rec = recorder.record()
    if rec.get("diverged"):  # the report says it first too (estimation.checks.diverged_run_notes)
        from ..estimation.checks import describe_divergence

        rank_zero_warn(f"TaskAttribution: the watched run diverged ({describe_divergence(rec['diverged'])}); its "
                       "final losses are not recorded and GradEx cannot follow it (estimator='auto' uses the "
                       "proximal solve at W0); the report says so first")
    if trainer.is_global_zero and callback.output_dir is not None:
        os.makedirs(callback.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(callback.output_dir, "run.json"), rec)
    return rec
