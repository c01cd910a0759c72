"""The exact target readout: how each source sample's output moves along the target loss's gradient.

GradEx's simulated run moves the weights by ``dW = -sum_t lr_t D (sum_i J_i^T g_i(t) w_i)`` (``D``:
the optimizer's diagonal preconditioner, identity for SGD). Read through the random projection, the
target loss change ``gbar . dW`` is an inner product between a diffuse weight change and the target
gradient, which the projection preserves badly (docs/gradex.md, measured). But it is linear in the
source samples: ``gbar . dW = -sum_t lr_t sum_i c_i . g_i(t) w_i`` with ``c_i = J_i (D gbar)``, one
number per sample and output, computed exactly here by one forward-mode pass (a JVP) per target
column. The simulation then needs no projection for the first-order part of the target loss
(:func:`lightning_ksm.estimation.simulate.simulate` uses it when the source features carry it).

Columns: one per target group (task id of the target split, in the order the store names them),
then ``"all"`` (every target sample), the same columns GradEx reports. The target gradient is
``gbar_j = sum_{x in j} J_x^T l'(f0_x) / n_j`` with the loss GradEx uses for the output mode.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Optional

import numpy as np
import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..task_ids import normalize_task_id
from .engine import harvest_precision, tree_map
from .outputs import scalarize

__all__ = ["ReadoutBuilder", "adam_preconditioner", "exact_readout", "preconditioned_projector", "READOUT_MODES"]

READOUT_MODES = ("margin", "logits", "regression", "logistic", "sequence")


def adam_preconditioner(optimizer, named_params: Mapping[str, torch.Tensor]) -> Optional[dict]:
    """``{name: 1 / sqrt(sqrt(v_hat) + eps)}`` from an Adam-type optimizer's second moments (the
    square root of its diagonal preconditioner), or None when it has none yet (SGD, no step taken),
    a selected parameter has none, or it is not finite (a diverged run: warns)."""
    if optimizer is None or not getattr(optimizer, "state", None):
        return None
    group_of = {}
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            group_of[id(p)] = group
    out = {}
    for name, p in named_params.items():
        st = optimizer.state.get(p)
        group = group_of.get(id(p))
        if not st or "exp_avg_sq" not in st or group is None:
            return None
        beta2 = float(group.get("betas", (0.9, 0.999))[1])
        step = float(st.get("step", 1))
        v_hat = st["exp_avg_sq"].detach().float() / (1 - beta2 ** max(step, 1.0))
        out[name] = (1.0 / torch.sqrt(torch.sqrt(v_hat) + float(group.get("eps", 1e-8)))).cpu()
    bad = [name for name, scale in out.items() if not bool(torch.isfinite(scale).all())]
    if bad:  # the run diverged before the harvest: NaN features would fail far from the cause
        warnings.warn(f"the optimizer's second moments hold NaN or inf for {', '.join(map(repr, bad[:5]))} (the "
                      "run diverged before the harvest): the gradients are harvested without its preconditioner")
        return None
    return out


def preconditioned_projector(projector, scale: Mapping[str, torch.Tensor]):
    """The projection of ``scale * grad`` (per parameter, elementwise): a copy of ``projector``
    whose ``project`` scales first; the factorized projection folds the scale into its factors
    instead (rank one per matrix, :meth:`FactorizedProjector.preconditioned`)."""
    return projector.with_scale(scale)


class ReadoutBuilder:
    """Collects the target gradients (:meth:`add_target`), then reads source batches (:meth:`source`).

    ``engine``: the harvest engine (its W0 tensors ``const``/``sel`` and functional model ``fmodel``);
    ``mode``: the output mode name; ``scale``: the per-parameter preconditioner square root (the
    features were projected from ``scale * grad``; the directions get ``scale ** 2``), or None;
    ``max_columns``: with more target groups than ``max_columns - 1`` only ``"all"`` is read out
    exactly (and, from the group that passes the limit on, one backward pass per batch is enough).
    """

    _ALL = object()  # the key of the single running sum once the groups are too many

    def __init__(self, engine, mode: str, scale: Optional[Mapping[str, torch.Tensor]] = None, max_columns: int = 8):
        if mode not in READOUT_MODES:
            raise ValueError(f"the exact readout needs one of the output modes {READOUT_MODES}, got {mode!r}")
        self.engine, self.mode = engine, mode
        self.scale, self.max_columns = scale, max_columns
        self._sums: dict = {}
        self._counts: dict = {}
        self.columns: list = []
        self.directions: list = []

    def _outputs(self, sel, inputs, labels) -> torch.Tensor:
        merged = dict(self.engine.const)
        merged.update({f"model.{n}": t for n, t in sel.items()})
        out = functional_call(self.engine.fmodel, merged, (tree_map(harvest_precision, inputs),))
        if self.mode == "logits":
            return out
        return scalarize(self.engine.mode, out, labels)[:, None]

    def _loss_gradient(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """d loss / d output at W0 for the loss GradEx uses with this mode (estimation/losses.py:
        cross-entropy on logits, logistic on a margin (label 1) or logit, squared for regression)."""
        out = out.double()
        if self.mode == "logits":
            g = torch.softmax(out, 1)
            g[torch.arange(len(out), device=out.device), labels.long()] -= 1.0
            return g
        if self.mode in ("margin", "sequence"):  # logistic loss, label 1
            return torch.sigmoid(out) - 1.0
        y = labels.reshape(len(out), 1).double()
        return torch.sigmoid(out) - y if self.mode == "logistic" else out - y

    def add_target(self, inputs, labels, task_ids) -> None:
        """Accumulate the loss gradient of one target batch per target group."""
        sel = {n: t.detach().requires_grad_(True) for n, t in self.engine.sel.items()}
        out = self._outputs(sel, inputs, labels)
        with torch.no_grad():
            g = self._loss_gradient(out.detach(), labels).to(out.dtype)
        groups = [normalize_task_id(t) for t in task_ids]
        if self._ALL not in self._sums and len(set(self._sums) | set(groups)) > self.max_columns - 1:
            self._collapse()
        if self._ALL in self._sums:
            groups = [self._ALL] * len(groups)
        for value in dict.fromkeys(groups):
            mask = torch.as_tensor([t is value or t == value for t in groups], device=out.device)
            weighted = (out[mask] * g[mask]).sum()
            grads = torch.autograd.grad(weighted, list(sel.values()), retain_graph=True, allow_unused=True)
            acc = self._sums.setdefault(value, {n_: torch.zeros_like(t) for n_, t in self.engine.sel.items()})
            for name, gr in zip(sel, grads):
                if gr is not None:
                    acc[name] += gr.detach()
            self._counts[value] = self._counts.get(value, 0) + int(mask.sum())

    def _collapse(self) -> None:
        """From here on only the sum over every target sample is kept."""
        total = {n: torch.zeros_like(t) for n, t in self.engine.sel.items()}
        for sums in self._sums.values():
            for n, v in sums.items():
                total[n] += v
        self._sums, self._counts = {self._ALL: total}, {self._ALL: sum(self._counts.values())}

    def finish_targets(self, order: Optional[list] = None) -> list:
        """Fix the columns (target groups in ``order``, then the rest sorted, then ``"all"``; only
        ``"all"`` when the groups were more than ``max_columns - 1``). Returns the column names."""
        if not self._sums:
            raise ValueError("the exact readout saw no target samples")
        groups = [v for v in (order or []) if v in self._sums]  # the given order, then the rest
        groups += [v for v in sorted(self._sums, key=str) if v not in groups and v is not self._ALL]
        total = sum(self._counts.values())
        cols, dirs = [], []
        if self._ALL not in self._sums:
            for v in groups:
                cols.append(str(v))
                dirs.append({n: s / self._counts[v] for n, s in self._sums[v].items()})
        all_dir = {n: sum(self._sums[v][n] for v in self._sums) / total for n in self.engine.sel}
        cols.append("all")
        dirs.append(all_dir)
        if self.scale is not None:
            dirs = [{n: d[n] * self.scale[n].to(d[n]) ** 2 for n in d} for d in dirs]
        self.columns, self.directions = cols, dirs
        self._sums = {}
        return cols

    def source(self, inputs, labels) -> np.ndarray:
        """``(n, C, T)``: each sample's output moved along every column's (preconditioned) direction."""
        if not self.directions:
            raise RuntimeError("finish_targets() must run before source batches are read")
        sel = {n: t.detach() for n, t in self.engine.sel.items()}
        parts = []
        for direction in self.directions:
            # scaled_dot_product_attention's fused kernels have no forward-mode derivative; its math
            # kernel (the same attention, written in ordinary ops) has: SDPA models keep the readout
            with sdpa_kernel(SDPBackend.MATH):
                _, dout = jvp(lambda p: self._outputs(p, inputs, labels), (sel,),
                              ({n: direction[n].to(sel[n]) for n in sel},))
            parts.append(dout.detach().double().cpu().numpy())
        return np.stack(parts, axis=-1)


def exact_readout(model, source_batches, target_batches, *, mode: str = "margin", scale=None, weights=None,
                  forward_fn=None, params=None, task_order=None, max_columns: int = 8):
    """The exact readout in memory: ``(readout (n, C, T), columns)`` for the source batches, in
    their order (``(inputs, labels, ...)`` tuples; the target batches also carry task ids third).
    ``scale``: the per-parameter preconditioner square root of the features (or None). The harvest
    runner does the same per shard (``HarvestConfig.exact_readout``); this is for harvests in memory.
    """
    from .engine import Engine
    from .params import select_parameters

    names = select_parameters(model, params=params)
    first = next(iter(model.parameters()))
    engine = Engine(model, names, mode, None, weights, forward_fn, first.device, 64)
    builder = ReadoutBuilder(engine, mode, scale, max_columns=max_columns)
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for batch in target_batches:
                builder.add_target(batch[0], batch[1], list(batch[2]))
            builder.finish_targets(order=task_order)
            parts = [builder.source(batch[0], batch[1]) for batch in source_batches]
    finally:
        for m, flag in training:
            m.training = flag
    return np.concatenate(parts), builder.columns
