"""Output modes: the per-sample scalar (or logit vector) that is linearized, and checks of the
model's outputs and the labels against the mode. Every error names the batch and sample."""

from __future__ import annotations

import numpy as np
import torch

from ..config import OUTPUT_MODES

__all__ = ["OUTPUT_MODES", "IGNORE_INDEX", "SequenceMode", "sequence_losses", "loss_margin", "scalarize",
           "check_outputs", "check_labels", "check_sequence_labels", "stored_labels"]

IGNORE_INDEX = -100  # token labels that take no loss (prompt, padding), as in torch and Hugging Face


class SequenceMode:
    """The ``"sequence"`` output mode as the engines use it: ``causal`` says the logits at position t
    predict label t + 1 (Hugging Face's shift for causal LMs), else label t belongs to logits t."""

    name = "sequence"

    def __init__(self, causal: bool = True):
        self.causal = causal

    def __eq__(self, other):  # compares equal to its name, like the other (string) modes
        if isinstance(other, SequenceMode):
            return other.causal == self.causal
        return isinstance(other, str) and other == "sequence"

    __hash__ = None

    def __repr__(self):
        return f"'sequence' ({'causal' if self.causal else 'aligned'} labels)"


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, causal: bool = True):
    """Per sample: the mean cross-entropy over its supervised tokens ``(n,)`` (the loss a causal-LM
    fine-tuning takes per sample) and the number of those tokens ``(n,)``."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"output='sequence': token labels (label_key) of shape {tuple(labels.shape)} do not "
                         f"match the logits' (batch, T) = {tuple(logits.shape[:2])}; pad labels and input_ids alike")
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).long().unsqueeze(-1)).squeeze(-1)
    token = torch.where(mask, torch.logsumexp(logits, dim=-1) - picked, torch.zeros_like(picked))
    count = mask.sum(1)
    return token.sum(1) / count.clamp_min(1), count


def loss_margin(loss: torch.Tensor) -> torch.Tensor:
    """The margin ``m`` whose logistic loss ``log(1 + exp(-m))`` is ``loss``: ``-log(expm1(loss))``,
    written to stay finite for small and large losses (a loss of 0 becomes the largest finite margin)."""
    loss = loss.clamp_min(torch.finfo(loss.dtype).tiny)
    return -(loss + torch.log(-torch.expm1(-loss)))

def scalarize(mode, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample scalar output ``(batch,)`` of a scalar mode from batched model outputs."""
    if isinstance(mode, str) and mode == "sequence":
        mode = SequenceMode()
    if mode == "margin":
        true = outputs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        classes = torch.arange(outputs.shape[1], device=outputs.device)
        mask = classes.unsqueeze(0) == labels.long().unsqueeze(1)
        others = torch.logsumexp(outputs.masked_fill(mask, float("-inf")), dim=1)
        return true - others
    if isinstance(mode, SequenceMode):
        # one row per sample: the margin whose logistic loss is the sample's mean token loss, so
        # GradEx's loss of it is that loss at W0, with its gradient (docs/gradex.md, output modes)
        return loss_margin(sequence_losses(outputs, labels, mode.causal)[0])
    if mode in ("regression", "logistic"):
        return outputs.reshape(outputs.shape[0])
    value = mode(outputs, labels)
    if not isinstance(value, torch.Tensor) or value.numel() != outputs.shape[0]:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"custom mode function must return one scalar per sample, shape ({outputs.shape[0]},); got {got}"
        )
    return value.reshape(outputs.shape[0])


def check_outputs(mode, outputs, n: int, batch_index: int) -> None:
    where = f"batch {batch_index}"
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"{where}: the model (or forward_fn) must return a tensor, got {type(outputs).__name__}")
    if outputs.dim() == 0 or outputs.shape[0] != n:
        raise ValueError(f"{where}: model output shape {tuple(outputs.shape)} has no batch dim of {n}")
    if mode == "sequence":
        if outputs.dim() != 3:
            raise ValueError(f"{where}: output='sequence' needs model logits of shape (batch, T, V), got "
                             f"{tuple(outputs.shape)}")
    elif mode in ("margin", "logits"):
        if outputs.dim() != 2:
            hint = ("; for a language model's (batch, T, V) logits with token labels use output='sequence'"
                    if outputs.dim() == 3 else " (use forward_fn to select e.g. the last token's logits)")
            raise ValueError(
                f"{where}: mode {mode!r} needs model outputs of shape (batch, C), got {tuple(outputs.shape)}{hint}"
            )
        if mode == "margin" and outputs.shape[1] < 2:
            raise ValueError(f"{where}: mode 'margin' needs C >= 2 logits; for one logit use mode='logistic'")
    elif mode in ("regression", "logistic"):
        if not (outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)):
            raise ValueError(
                f"{where}: mode {mode!r} needs one scalar output per sample, shape (batch,) or "
                f"(batch, 1); got {tuple(outputs.shape)}"
            )


def check_sequence_labels(labels: torch.Tensor, n: int, length: int | None, vocab: int | None, causal: bool,
                          where: str) -> None:
    """Token labels of output='sequence': ``(batch, T)`` class indices or -100, T the logits' length,
    and every sample with at least one supervised token (its loss is a mean over them)."""
    if labels.dim() != 2 or labels.shape[0] != n:
        raise ValueError(f"{where}: output='sequence' needs token labels of shape (batch, T) = ({n}, T) (the "
                         f"batch's 'labels', label_key), got {tuple(labels.shape)}")
    if length is not None and labels.shape[1] != length:
        raise ValueError(f"{where}: the token labels (label_key) have length {labels.shape[1]} but the model's "
                         f"logits have length {length}; pad labels and input_ids alike (labels -100 on padding)")
    if labels.is_floating_point():
        raise ValueError(f"{where}: output='sequence' needs integer token labels (label_key), got {labels.dtype}")
    used = labels[:, 1:] if causal else labels
    supervised = used != IGNORE_INDEX
    bad = torch.nonzero(supervised & ((used < 0) | (used >= (vocab if vocab is not None else 2**62))))
    if len(bad):
        i, t = (int(v) for v in bad[0])
        raise ValueError(f"{where}, sample {i}: token label {int(used[i, t])} is neither {IGNORE_INDEX} nor a token "
                         f"id below the vocabulary size {vocab}")
    empty = torch.nonzero(~supervised.any(1)).flatten()
    if len(empty):
        shift = " after the causal shift (the first label is never predicted)" if causal else ""
        raise ValueError(f"{where}, sample {int(empty[0])}: no supervised token (every label is {IGNORE_INDEX}"
                         f"{shift}); its per-sample loss would be undefined")


def check_labels(mode, labels: torch.Tensor, n: int, n_classes: int | None, batch_index: int) -> None:
    where = f"batch {batch_index}"
    if isinstance(mode, SequenceMode):
        return check_sequence_labels(labels, n, None, n_classes, mode.causal, where)
    if callable(mode):
        if labels.dim() == 0 or labels.shape[0] != n:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} need a batch dim of {n}")
        if labels.numel() != n:  # GradEx's loss= reads one label per sample against the scalar output
            raise ValueError(
                f"{where}: a callable output gives one scalar per sample, so GradEx's loss needs one label per "
                f"sample (shape ({n},)), got labels of shape {tuple(labels.shape)}; for a language model's token "
                "labels use output='sequence'")
        return
    if mode in ("regression", "logistic"):
        if labels.numel() != n:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} need one value per sample ({n})")
    elif labels.shape != (n,):
        raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} must be class indices of shape ({n},)")
    flat = labels.reshape(-1)
    if mode in ("margin", "logits"):
        if labels.is_floating_point():
            bad = torch.nonzero(flat != flat.round()).flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"{where}, sample {i}: label {flat[i].item()} is not a class index")
        bad = torch.nonzero((flat < 0) | (flat >= n_classes)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{where}, sample {i}: label {flat[i].item()} is out of range for {n_classes} classes"
            )
    elif mode == "logistic":
        bad = torch.nonzero((flat != 0) & (flat != 1)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{where}, sample {i}: logistic labels must be 0 or 1, got {flat[i].item()}")
    elif mode == "regression":
        bad = torch.nonzero(~torch.isfinite(flat.double())).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{where}, sample {i}: regression label {flat[i].item()} is not finite")



def stored_labels(mode_name: str, labels: torch.Tensor, outputs: np.ndarray) -> np.ndarray:
    """The labels as stored with the features: class indices (logits), 1.0 (margin, sequence: the
    margin is already relative to the true class / tokens), the float target (regression / logistic), or as given."""
    n = len(outputs)
    if mode_name == "logits":
        return labels.cpu().numpy().astype(np.int64)
    if mode_name in ("margin", "sequence"):
        return np.ones(n, dtype=outputs.dtype)
    if mode_name in ("regression", "logistic"):
        return labels.detach().cpu().numpy().reshape(n).astype(outputs.dtype)
    return labels.detach().cpu().numpy()
