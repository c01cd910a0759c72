"""GradEx: linearized fine-tuning on many task subsets at once (paper section 3.3, Algorithm 2).

Modules: :mod:`.losses` (the losses), :mod:`.checks` (input checks), :mod:`.settings` (solver
settings), :mod:`.newton` (the batched Newton-CG kernel), :mod:`.solver` (batches of subsets,
:func:`solve_subsets`) and :mod:`.estimate` (target evaluation, :func:`gradex`).

Around the snapshot weights W0 a model output is replaced by its first-order expansion
(equation 9): ``f(x) ~ f0(x) + J(x) z``, where ``J(x)`` is the (randomly projected) Jacobian of
the output and ``z`` the (projected) weight change. Fine-tuning on a subset ``s`` of the K source
tasks then becomes a small convex problem in ``z`` (k numbers):

    Z*_s = argmin_z  sum_t a_st * sum_{i in T_t} loss(f0_i + J_i z, y_i) + lam/2 |z|^2

with per-sample weights ``a_st``: ``weighting="task"`` gives ``s_t / (|s| n_t)`` (every task is
averaged over its own samples, then the selected tasks are averaged), ``weighting="sample"`` gives
``s_t / sum_u s_u n_u`` (every selected sample counts the same). The estimate ``F^(s)`` is the mean
loss of ``f0 + J Z*_s`` on each target group.

The m subsets are solved together: all their predictions are one matrix product ``J Z`` and all
their gradients another. Newton's method with conjugate gradients (exact Hessian-vector products)
is preconditioned, per subset, by the Hessian at ``z = 0``; that Hessian is a weighted sum of K
per-task matrices computed once, so every preconditioner costs one small Cholesky factorization.
For the squared loss the Hessian does not depend on ``z``, so the first Newton step is the exact
closed-form solution. By default (``dtype="auto"``) the solve runs in float32 and any subset that
float32 cannot bring to tolerance is finished in float64. See docs/gradex.md.

:mod:`.simulate` is the estimator that follows the watched training run instead (the recorded
optimizer, learning rate, schedule and steps, run on the same linearized model), and
:mod:`.select` picks between the two (``AnalysisConfig.estimator``).
"""

from .estimate import GradExResult, gradex
from .losses import LOSSES, default_loss
from .newton import WEIGHTINGS, subset_sample_weights
from .select import estimate_subsets, resolve_estimator
from .settings import PRECONDITIONERS
from .simulate import simulate
from .solver import GradExConvergenceWarning, SubsetSolutions, solve_subsets

__all__ = [
    "LOSSES",
    "PRECONDITIONERS",
    "WEIGHTINGS",
    "GradExConvergenceWarning",
    "GradExResult",
    "SubsetSolutions",
    "default_loss",
    "estimate_subsets",
    "gradex",
    "resolve_estimator",
    "simulate",
    "solve_subsets",
    "subset_sample_weights",
]
