"""Per-chunk computation of outputs and projected Jacobians with ``torch.func``.

``functional_call`` + ``vmap(grad)`` for scalar outputs, ``vmap`` of a vector-Jacobian product
over classes for logits, in chunks, so that at most ``chunk_size`` per-sample gradients (each of
size d) exist at any time.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from .hf import call_model
from .outputs import scalarize

__all__ = ["Engine", "tree_leaves", "tree_map", "prepare_tensor", "harvest_precision"]

# The harvest computes in float32 at least: a model trained in bf16/fp16 (precision="bf16-true") is
# linearized at its own W0 values, upcast, and its float inputs with them (docs/gradex.md says why).
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def harvest_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a bf16/fp16 tensor, else as it is."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def tree_leaves(obj, path="inputs"):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from tree_leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tree_leaves(value, f"{path}[{i}]")
    else:
        raise TypeError(
            f"{path} is a {type(obj).__name__}; inputs must be a tensor or dicts/lists/tuples of "
            "tensors (move other values into forward_fn)"
        )


def tree_map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v) for v in obj)
    raise TypeError(f"unsupported input type {type(obj).__name__}")


def prepare_tensor(t: torch.Tensor, device) -> torch.Tensor:
    t = harvest_precision(t.to(device))
    if t.is_inference():  # e.g. made under trainer.validate()'s inference_mode
        t = t.clone()
    return t


# -- the functional model ----------------------------------------------------------------------
class _Forward(nn.Module):
    """Wraps ``model`` so that ``functional_call`` swaps its tensors while ``forward_fn`` runs."""

    def __init__(self, model: nn.Module, forward_fn: Callable | None) -> None:
        super().__init__()
        self.model = model
        self._forward_fn = forward_fn

    def forward(self, inputs):
        return call_model(self.model, inputs, self._forward_fn)


def _first_nonfinite(t: torch.Tensor) -> int | None:
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bad.any():
        return int(torch.nonzero(bad)[0])
    return None


class Engine:
    """Per-chunk computation of outputs and projected Jacobians for one model and mode."""

    def __init__(self, model, names, mode, projector, weights, forward_fn, device, chunk_size):
        self.mode = mode
        self.projector = projector
        self.names = names
        self.chunk_size = chunk_size
        self.fmodel = _Forward(model, forward_fn)
        tensors = {}
        for n, p in model.named_parameters():
            tensors[n] = p.detach()
        for n, b in model.named_buffers():
            tensors[n] = b.detach()
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"weights must be a dict name -> tensor, got {type(weights).__name__}")
            unknown = [n for n in weights if n not in tensors]
            if unknown:
                raise ValueError(f"weights has entries {unknown[:5]} that are not parameters/buffers of the model")
            for n, w in weights.items():
                w = torch.as_tensor(w)
                if tuple(w.shape) != tuple(tensors[n].shape):
                    raise ValueError(
                        f"weights[{n!r}] has shape {tuple(w.shape)}, the model's has {tuple(tensors[n].shape)}"
                    )
                tensors[n] = w.detach().to(dtype=tensors[n].dtype)
        tensors = {n: harvest_precision(t) for n, t in tensors.items()}
        self.const = {f"model.{n}": t.to(device) for n, t in tensors.items() if n not in names}
        self.sel = {n: tensors[n].to(device) for n in names}

    def call(self, sel: dict, inputs):
        merged = dict(self.const)
        merged.update({f"model.{n}": t for n, t in sel.items()})
        return functional_call(self.fmodel, merged, (inputs,))

    def forward_batch(self, inputs):
        with torch.no_grad():
            return self.call(self.sel, inputs)

    def _sample_scalar(self, sel, x, y):
        xb = tree_map(lambda t: t.unsqueeze(0), x)
        value = scalarize(self.mode, self.call(sel, xb), y.unsqueeze(0))[0]
        return value, value.detach()

    def _sample_vector(self, sel, x, basis):
        xb = tree_map(lambda t: t.unsqueeze(0), x)
        out, pullback = vjp(lambda p: self.call(p, xb)[0], sel)
        (jac,) = vmap(pullback)(basis)
        return jac, out.detach()

    def run(self, inputs, labels, n: int, n_classes: int | None, batch_index: int):
        """Outputs ``(n,)``/``(n, C)`` and projected Jacobians ``(n, k)``/``(n, C, k)`` of one batch."""
        vector = self.mode == "logits"
        if vector:
            per_sample = max(1, self.chunk_size // n_classes)
            class_block = min(n_classes, self.chunk_size)
        else:
            per_sample, class_block = self.chunk_size, None
        outs, jacs = [], []
        for s in range(0, n, per_sample):
            e = min(n, s + per_sample)
            xs = tree_map(lambda t: t[s:e], inputs)
            if not vector:
                fn = vmap(grad(self._sample_scalar, has_aux=True), in_dims=(None, 0, 0))
                grads, values = fn(self.sel, xs, labels[s:e])
                projected = self.projector.project(grads)
                self._check_finite(values, projected, grads, s, batch_index)
                outs.append(values)
                jacs.append(projected)
                continue
            fn = vmap(self._sample_vector, in_dims=(None, 0, None))
            eye = torch.eye(n_classes, dtype=next(iter(self.sel.values())).dtype, device=labels.device)
            parts = []
            for c0 in range(0, n_classes, class_block):
                grads, values = fn(self.sel, xs, eye[c0: c0 + class_block])
                projected = self.projector.project(grads)
                self._check_finite(values, projected, grads, s, batch_index)
                parts.append(projected)
            outs.append(values)
            jacs.append(torch.cat(parts, dim=1))
        return torch.cat(outs), torch.cat(jacs)

    @staticmethod
    def _check_finite(values, projected, grads, offset, batch_index):
        i = _first_nonfinite(values)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the model output is not finite")
        # A non-finite gradient entry makes its projection non-finite (every coordinate has nonzero
        # weights), so the cheap check is on the k-dim projection; the d-dim scan runs only to
        # name the culprit.
        if _first_nonfinite(projected) is None:
            return
        for name, g in grads.items():
            i = _first_nonfinite(g)
            if i is not None:
                raise ValueError(
                    f"batch {batch_index}, sample {offset + i}: the gradient of parameter {name!r} is not finite"
                )
        i = _first_nonfinite(projected)
        raise ValueError(f"batch {batch_index}, sample {offset + i}: the projected gradient is not finite (overflow)")
