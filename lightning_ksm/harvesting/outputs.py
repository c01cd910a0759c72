"""Output modes: the per-sample scalar (or logit vector) that is linearized, and checks of the
model's outputs and the labels against the mode. Every error names the batch and sample."""

from __future__ import annotations

import numpy as np
import torch

from ..config import OUTPUT_MODES

__all__ = ["OUTPUT_MODES", "scalarize", "check_outputs", "check_labels", "stored_labels"]

def scalarize(mode, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample scalar output ``(batch,)`` of a scalar mode from batched model outputs."""
    if mode == "margin":
        true = outputs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        classes = torch.arange(outputs.shape[1], device=outputs.device)
        mask = classes.unsqueeze(0) == labels.long().unsqueeze(1)
        others = torch.logsumexp(outputs.masked_fill(mask, float("-inf")), dim=1)
        return true - others
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
    if mode in ("margin", "logits"):
        if outputs.dim() != 2:
            raise ValueError(
                f"{where}: mode {mode!r} needs model outputs of shape (batch, C), got "
                f"{tuple(outputs.shape)} (use forward_fn to select e.g. the last token's logits)"
            )
        if mode == "margin" and outputs.shape[1] < 2:
            raise ValueError(f"{where}: mode 'margin' needs C >= 2 logits; for one logit use mode='logistic'")
    elif mode in ("regression", "logistic"):
        if not (outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)):
            raise ValueError(
                f"{where}: mode {mode!r} needs one scalar output per sample, shape (batch,) or "
                f"(batch, 1); got {tuple(outputs.shape)}"
            )


def check_labels(mode, labels: torch.Tensor, n: int, n_classes: int | None, batch_index: int) -> None:
    where = f"batch {batch_index}"
    if callable(mode):
        if labels.dim() == 0 or labels.shape[0] != n:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} need a batch dim of {n}")
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
    """The labels as stored with the features: class indices (logits), 1.0 (margin: the margin is
    already relative to the true class), the float target (regression / logistic), or as given."""
    n = len(outputs)
    if mode_name == "logits":
        return labels.cpu().numpy().astype(np.int64)
    if mode_name == "margin":
        return np.ones(n, dtype=outputs.dtype)
    if mode_name in ("regression", "logistic"):
        return labels.detach().cpu().numpy().reshape(n).astype(outputs.dtype)
    return labels.detach().cpu().numpy()
