"""GradEx's entry point: solve every subset, then evaluate the linearized model on the target split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..features import HarvestedFeatures
from .checks import check_source_subsets, check_target, task_names
from .losses import LOSS_IMPL
from .newton import labels_tensor, to_tensor
from .settings import resolve_settings
from .solver import Solver, warn_unconverged

__all__ = ["GradExResult", "gradex"]


@dataclass
class GradExResult:
    """Estimated target losses F^(s) for m subsets and T target groups.

    - ``losses``: ``(m, T)`` mean loss of the linearized model ``f0 + J Z*_s`` on each target
      group; ``target_names`` names the T columns: one per target task present in the target
      split (in task-id order), then ``"all"`` (every target sample).
    - ``accuracy``: ``(m, T)`` for classification losses (argmax for cross-entropy, sign for
      logistic), else ``None``.
    - ``metric_values``: ``(m, T)`` values of the user ``metric`` callable, or ``None``.
    - ``converged``, ``n_iter``, ``grad_norms``, ``solution_norms``: per-subset solver facts.
    - ``solutions``: ``(m, k)`` Z*_s when ``keep_solutions=True``, else ``None``.
    """

    losses: np.ndarray
    target_names: list
    subsets: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    grad_norms: np.ndarray
    solution_norms: np.ndarray
    loss: str
    weighting: str
    lam: float
    accuracy: Optional[np.ndarray] = None
    metric_values: Optional[np.ndarray] = None
    solutions: Optional[np.ndarray] = None
    extras: dict = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        """The ``(m,)`` estimated losses of one target group, by name (e.g. ``"all"``)."""
        try:
            j = self.target_names.index(name)
        except ValueError:
            raise KeyError(f"no target group {name!r}; groups are {self.target_names}") from None
        return self.losses[:, j]


class _Target:
    """Target features on the device, with the group-averaging matrix (T, n_t)."""

    def __init__(self, feats, loss, C, device, dtype):
        self.loss = LOSS_IMPL[loss]
        J = to_tensor(feats.jacobians, device, dtype)
        n = J.shape[0]
        self.n, self.C = n, C
        self.Jf = J.reshape(n * C, -1)
        self.f0 = to_tensor(feats.outputs, device, dtype).reshape(n * C, 1)
        self.y = labels_tensor(feats, loss, C, device, dtype)
        self.labels_np = np.asarray(feats.labels)
        names = task_names(feats)
        tid = np.asarray(feats.task_ids).astype(np.int64)
        present = np.unique(tid)
        self.names = [names[t] for t in present] + ["all"]
        avg = np.zeros((len(present) + 1, n))
        for row, t in enumerate(present):
            avg[row, tid == t] = 1.0 / np.sum(tid == t)
        avg[-1] = 1.0 / n
        self.masks = [tid == t for t in present] + [np.ones(n, dtype=bool)]
        self.avg = torch.as_tensor(avg, device=device).to(dtype)

    def predictions(self, Z: torch.Tensor) -> torch.Tensor:
        return (self.f0 + self.Jf @ Z).view(self.n, self.C, -1)

    def linear_part(self, Z: torch.Tensor) -> torch.Tensor:
        """``(T, m)``: the first-order change of each group's mean loss through the projected
        features, ``gbar_proj . z`` (what an exact readout replaces)."""
        g0, _ = self.loss.grad_and_curv(self.f0.view(self.n, self.C, 1), self.y)
        moved = (self.Jf @ Z.to(self.Jf.dtype)).view(self.n, self.C, -1)
        return self.avg @ (g0 * moved).sum(1)

    def evaluate(self, Z, want_accuracy, metric):
        P = self.predictions(Z)
        losses = (self.avg @ self.loss.value(P, self.y)).T.cpu().numpy()
        acc = None
        if want_accuracy and self.loss.predict_correct is not None:
            acc = (self.avg @ self.loss.predict_correct(P, self.y)).T.cpu().numpy()
        vals = None
        if metric is not None:
            Pn = P.cpu().numpy()
            vals = np.empty((Z.shape[1], len(self.names)))
            for j in range(Z.shape[1]):
                out = Pn[:, :, j] if self.C > 1 else Pn[:, 0, j]
                for g, mask in enumerate(self.masks):
                    vals[j, g] = float(metric(out[mask], self.labels_np[mask]))
        return losses, acc, vals


def gradex(
    source: HarvestedFeatures,
    target: HarvestedFeatures,
    subsets,
    *,
    lam: float = 1e-3,
    loss: Optional[str] = None,
    weighting: str = "task",
    batch_size: Optional[int] = None,
    max_iter: int = 50,
    max_cg: Optional[int] = None,
    preconditioner: str = "auto",
    tol: Optional[float] = None,
    device="cpu",
    dtype="auto",
    accuracy: bool = True,
    metric: Optional[Callable[[np.ndarray, np.ndarray], float]] = None,
    keep_solutions: bool = False,
    progress: bool = False,
) -> GradExResult:
    """Estimate the target loss F^(s) of fine-tuning on each task subset, without retraining.

    For every row ``s`` of ``subsets`` (an ``(m, K)`` 0/1 array over the source tasks) this solves

        Z*_s = argmin_z  sum_t a_st sum_{i in T_t} loss(f0_i + J_i z, y_i) + lam/2 |z|^2

    on the ``source`` features (``a_st`` from :func:`subset_sample_weights`, set by
    ``weighting``), then returns the mean loss of ``f0 + J Z*_s`` on each target group.

    Parameters
    ----------
    source, target:
        Harvested features of the training (source) split and of the evaluation (target) split;
        both must have the same projection dimension k and output shape.
    subsets:
        ``(m, K)`` bool or 0/1 array, one column per name in ``source.task_names``.
    lam:
        Ridge strength lambda > 0 of the proximal term lambda/2 |z|^2 (the objective's loss part
        is a weighted mean, so lambda does not need to scale with the number of samples).
    loss:
        ``"cross_entropy"``, ``"logistic"`` or ``"squared"``; by default chosen from
        ``source.mode`` (logits -> cross_entropy, margin/logistic -> logistic,
        regression -> squared). The same loss is used on the target.
    weighting:
        ``"task"`` (each selected task weighs the same) or ``"sample"`` (each selected sample
        weighs the same).
    batch_size:
        subsets solved together; ``None`` picks the largest batch within ~1 GiB of working memory.
    max_iter, max_cg, tol:
        Newton steps, CG steps per Newton step (default 50 with the Cholesky preconditioner,
        1000 with the diagonal one), and the relative gradient-norm tolerance: stop when
        ``|grad| <= tol * |grad at z=0|`` (default 1e-8 for float64, 1e-5 for float32). Subsets
        that miss it are reported in ``converged`` and a :class:`GradExConvergenceWarning` is issued.
    preconditioner:
        ``"cholesky"``: each subset's exact Hessian at z = 0 (k x k, factored once);
        ``"diagonal"``: its diagonal only, for very large k; ``"auto"`` (default) picks Cholesky
        while K + 16 matrices of k x k fit in 1 GiB and k <= n C (source samples x outputs).
    device, dtype:
        where and in which precision to solve. ``dtype="auto"`` (default): float32 first (tolerance
        1e-5), then float64 (tolerance 1e-8) for the subsets float32 could not finish;
        ``torch.float64`` or ``torch.float32`` use one precision throughout. Target losses are
        always evaluated in float64.
    accuracy:
        also report classification accuracy per group (classification losses only).
    metric:
        optional callable ``metric(outputs, labels) -> float`` evaluated per subset and group on
        the linearized target outputs (``(n_g,)`` for scalar outputs, ``(n_g, C)`` for logits).
    keep_solutions:
        keep the ``(m, k)`` solutions in the result.
    progress:
        show a tqdm progress bar over subsets.
    """
    cfg = resolve_settings(source, loss, weighting, lam, dtype, tol, max_iter, batch_size, preconditioner, max_cg)
    loss = cfg.loss
    check_target(source, target, loss, metric)
    S, names = check_source_subsets(source, subsets, loss)

    solver = Solver(source, names, cfg, device)
    # Target losses in float64 always: F^ differences between subsets can be small.
    tgt = _Target(target, loss, solver.problem(cfg.dtypes[0]).C, device, torch.float64)
    bs = solver.batch_size(S.shape[0], batch_size, tgt.n)
    parts = {key: [] for key in ("loss", "acc", "metric", "conv", "iter", "gn", "norm", "Z")}
    for Z, c, it, gn in solver.batches(S, bs, progress, "GradEx"):
        lo, acc, vals = tgt.evaluate(Z, accuracy, metric)
        parts["loss"].append(lo)
        parts["acc"].append(acc)
        parts["metric"].append(vals)
        parts["conv"].append(c)
        parts["iter"].append(it)
        parts["gn"].append(gn)
        parts["norm"].append(Z.norm(dim=0).cpu().numpy())
        if keep_solutions:
            parts["Z"].append(Z.T.cpu().numpy())

    def cat(key):
        items = parts[key]
        return None if not items or items[0] is None else np.concatenate(items)

    result = GradExResult(
        losses=cat("loss"),
        target_names=tgt.names,
        subsets=S.copy(),
        converged=cat("conv"),
        n_iter=cat("iter"),
        grad_norms=cat("gn"),
        solution_norms=cat("norm"),
        loss=loss,
        weighting=weighting,
        lam=float(lam),
        accuracy=cat("acc"),
        metric_values=cat("metric"),
        solutions=cat("Z") if keep_solutions else None,
        extras={
            "tol": {str(k).replace("torch.", ""): v for k, v in cfg.tols.items()},
            "batch_size": bs,
            "dtype": dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
            "preconditioner": cfg.preconditioner,
            "float64_resolved": solver.n_refined if len(cfg.dtypes) > 1 else 0,
        },
    )
    warn_unconverged(result.converged, result.grad_norms)
    return result
