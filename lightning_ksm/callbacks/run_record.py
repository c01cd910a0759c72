"""The record of the training run the callback watches: what GradEx's ``simulate`` estimator follows.

:class:`RunRecorder` reads, from the trainer it is given (no Lightning import here):

- at train start: the optimizer's type and hyperparameters (lr, betas, eps, weight decay, momentum,
  dampening, Nesterov, amsgrad) of its first parameter group, the learning-rate schedulers'
  class names and intervals, ``max_steps`` / ``max_epochs``, gradient accumulation, the train
  loader's batch size and number of samples;
- after every training batch: the learning rate of the step just taken (the lr schedule), and per
  epoch the optimizer steps taken and the samples of each task drawn (the task ids of the batch);
- at the end: the optimizer steps and epochs really run, whether the run was epoch-based (no
  ``max_steps``: a subset with less data gets fewer steps), the real all-tasks outcome (the mean
  loss on every target loader after training, per target task and ``"all"``) and the real weight
  displacement ``|W_T - W0|`` over the linearized parameters (one pass over the parameters); the
  per-epoch steps and draws (``per_epoch``, draws added over the DDP ranks) and where a resumed fit
  continued (``resumed``: a mid-epoch checkpoint restarts that epoch's data loader).

The recorder's state travels in the callback's checkpoint state (:meth:`RunRecorder.state_dict`),
so a resumed fit records the whole run: its lr schedule, and the epochs before the resume.

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
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import torch

from ..harvesting.outputs import sequence_losses
from ..task_ids import normalize_task_id
from .ranks import gather, on_all_ranks

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


def _loss_per_sample(outputs: torch.Tensor, labels: torch.Tensor, output_mode,
                     sequence_labels: str = "causal", loss: Optional[str] = None) -> torch.Tensor:
    if callable(output_mode):  # the user's scalar per sample under the GradEx loss it is analysed with
        outputs, output_mode = output_mode(outputs, labels), {"logistic": "logistic", "squared": "regression"}[loss]
    if output_mode == "sequence":  # the mean token loss of each sample, as the harvest linearizes it
        return sequence_losses(outputs.float(), labels, sequence_labels == "causal")[0]
    if output_mode == "regression":
        return 0.5 * (outputs.reshape(len(labels), -1).float() - labels.reshape(len(labels), -1).float()).pow(2).sum(1)
    if output_mode == "logistic":
        return torch.nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1).float(), labels.reshape(-1).float(), reduction="none")
    return torch.nn.functional.cross_entropy(outputs.float(), labels.long(), reduction="none")


@torch.no_grad()
def final_target_losses(module, loaders, reader, *, forward_fn=None, output_mode="margin",
                        device=None, world: Optional[int] = None, sequence_labels: str = "causal",
                        loss: Optional[str] = None) -> dict:
    """Mean loss of ``module`` on the target loaders, per target task id and ``"all"`` (the loss
    GradEx models: cross-entropy for margin / logits, squared error, binary cross-entropy, the mean
    token cross-entropy per sample for sequence), added over the DDP ranks (``world``: the trainer's
    world size; None: the process group's)."""
    from ..harvesting.batches import to_device
    from ..harvesting.hf import call_model

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
                out = call_model(module, inputs, forward_fn)
                losses = _loss_per_sample(out, labels.to(out.device), output_mode, sequence_labels, loss).double().cpu()
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


def _runs(values: list) -> list:
    """``[[value, repeats], ...]``: an lr schedule as the checkpoint keeps it (short for a constant lr)."""
    out: list = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


class RunRecorder:
    """Collects the record of one ``trainer.fit`` (see the module docs); :meth:`record` returns it."""

    def __init__(self) -> None:
        self._rec: dict = {}
        self.lr_schedule: list = []
        self._opt = None  # set by start(); a recorder finished without it records no optimizer
        self._nonfinite_loss = _FirstNonFiniteLoss()
        self._epochs: dict = {}  # epoch -> {"steps", "batches", "drawn": {task: samples on this rank}}
        self._step = 0  # the global step after the last batch seen
        self._draws = True  # False: a training batch had no readable task ids (no draws recorded)
        self._complete = True  # False: resumed from a checkpoint without this state (epochs before it unknown)
        self._resumes: list = []
        self._restored = False
        self._pending: list = []  # (the epoch's draws, the task ids of a batch) not yet counted

    def start(self, trainer) -> None:
        opts = list(getattr(trainer, "optimizers", None) or [])
        rec = {"optimizer": optimizer_record(opts[0]) if opts else None, "n_optimizers": len(opts)}
        max_steps = getattr(trainer, "max_steps", -1)
        rec["max_steps"] = None if max_steps in (None, -1) else int(max_steps)
        max_epochs = getattr(trainer, "max_epochs", None)
        rec["max_epochs"] = None if max_epochs in (None, -1) else int(max_epochs)
        rec["accumulate_grad_batches"] = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        rec["world_size"] = int(getattr(trainer, "world_size", 1) or 1)
        rec["limit_train_batches"] = _plain(getattr(trainer, "limit_train_batches", None))
        rec["lr_schedulers"] = _scheduler_info(trainer)
        loader = getattr(trainer, "train_dataloader", None)
        if loader is not None:
            rec.update(_loader_info(loader))
        step, epoch = int(getattr(trainer, "global_step", 0)), int(getattr(trainer, "current_epoch", 0))
        if self._restored:  # resumed with this state: the optimizer as the run started (its lr is not yet scheduled)
            rec["optimizer"] = self._rec.get("optimizer", rec["optimizer"])
        else:
            self.lr_schedule, self._epochs, self._resumes, self._pending = [], {}, [], []
            self._draws, self._complete = True, step == 0  # steps before this fit: not seen
        if step > 0:  # a resumed fit; a checkpoint taken inside an epoch restarts that epoch's loader
            self._resumes.append({"epoch": epoch, "step": step,
                                  "mid_epoch": bool(self._epochs.get(epoch, {}).get("batches")) if self._complete else None})
        self._rec, self._step, self._restored = rec, step, False
        self._opt = opts[0] if opts else None
        self._nonfinite_loss = _FirstNonFiniteLoss()

    def after_batch(self, trainer, outputs=None, batch_idx: Optional[int] = None, batch=None, reader=None) -> None:
        """Per training batch: the steps of this epoch and the samples of each task drawn (task ids
        read with ``reader``); once per optimizer step, the lr of the step just taken; the epoch and
        batch where the training loss (``outputs``, what ``training_step`` returned) was first not finite."""
        self._nonfinite_loss.update(outputs, int(getattr(trainer, "current_epoch", 0)), batch_idx)
        step = int(getattr(trainer, "global_step", 0))
        epoch = self._epochs.setdefault(int(getattr(trainer, "current_epoch", 0)), {"steps": 0, "batches": 0, "drawn": {}})
        epoch["steps"] += max(0, step - self._step)
        epoch["batches"] += 1
        self._step = step
        if self._draws and reader is not None:
            try:
                tasks = reader.read(batch)[2]
                self._pending.append((epoch["drawn"], tasks.detach() if isinstance(tasks, torch.Tensor) else list(tasks)))
            except Exception:  # noqa: BLE001 - the record of the draws is optional; training goes on
                self._draws = False
            if len(self._pending) >= 256:
                self._count_pending()
        if self._opt is None:
            return
        if step > len(self.lr_schedule):
            inner = getattr(self._opt, "optimizer", self._opt)
            lr = float(inner.param_groups[0]["lr"])
            self.lr_schedule.extend([lr] * (step - len(self.lr_schedule)))

    def _count_pending(self) -> None:
        """Add the task ids of the batches since the last call to the draws: read from the device
        every 256 batches, not at every step (no synchronization per step)."""
        pending, self._pending = self._pending, []
        try:
            for drawn, tasks in pending:
                for task, count in Counter(tasks.tolist() if isinstance(tasks, torch.Tensor) else tasks).items():
                    key = str(normalize_task_id(task))
                    drawn[key] = drawn.get(key, 0) + count
        except Exception:  # noqa: BLE001 - unreadable task ids: no draws recorded
            self._draws = False

    def _per_epoch(self) -> Optional[list]:
        """``[{"epoch", "steps", "drawn": {task: samples of all ranks} or None}]``; None when the epochs
        before a resume are unknown. Collective under DDP: every rank calls it."""
        if not self._complete:
            return None
        self._count_pending()
        ranks = gather({e: v["drawn"] for e, v in self._epochs.items()} if self._draws else None)
        out = []
        for e in sorted(self._epochs):
            drawn = None
            if all(r is not None for r in ranks):
                drawn = {}
                for r in ranks:
                    for task, count in r.get(e, {}).items():
                        drawn[task] = drawn.get(task, 0) + count
            out.append({"epoch": e, "steps": self._epochs[e]["steps"], "drawn": drawn})
        return out

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
        rec["per_epoch"] = self._per_epoch()
        rec["resumed"] = list(self._resumes)
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

    def state_dict(self) -> dict:
        """What a checkpoint keeps (this rank's draws; under DDP the checkpoint holds rank 0's, so a
        resumed run counts rank 0's draws before the resume on every rank: the same totals)."""
        self._count_pending()
        epochs = {e: {**v, "drawn": dict(v["drawn"])} for e, v in self._epochs.items()}  # a copy: saving may lag
        return {"rec": dict(self._rec), "lr_schedule": _runs(self.lr_schedule), "epochs": epochs,
                "draws": self._draws, "complete": self._complete, "resumes": list(self._resumes)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:  # a checkpoint from before the recorder kept its state
            return
        self._rec = dict(state.get("rec") or {})
        self.lr_schedule = [float(v) for v, n in state.get("lr_schedule") or [] for _ in range(int(n))]
        self._epochs = {int(e): v for e, v in (state.get("epochs") or {}).items()}
        self._draws, self._complete = bool(state.get("draws", True)), bool(state.get("complete", True))
        self._resumes, self._pending = list(state.get("resumes") or []), []
        self._restored = True


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
                                     output_mode=callback.harvest.output, world=trainer.world_size,
                                     sequence_labels=callback.harvest.sequence_labels, loss=callback.analysis.loss)
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
