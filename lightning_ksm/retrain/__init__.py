"""Ground truth by real retraining: train on task subsets, record F(s), and score estimates against it.

An attribution method is only as good as its agreement with what really happens when you retrain.
This package makes that measurable (modules: :mod:`.runner`, :mod:`.records`,
:mod:`.train_fn`, :mod:`.compare`, :mod:`.finetune`; held-out scoring lives in
:mod:`lightning_ksm.quality`):

- :func:`retrain_subsets` really trains one model per task subset with a user function
  ``train_fn(subset, seed) -> {target_name: loss}`` and records F(s) for every target group. It is
  seeded (every subset gets a deterministic seed and fresh global RNG states), resumable (every
  finished subset is a small JSON file in ``directory``; a rerun skips those), and runs subsets in
  parallel processes (``n_jobs > 1``, ``spawn`` start method).
- :class:`LightningTrainFn` turns Lightning factories (module, trainer, train loader, evaluation)
  into such a ``train_fn``. This package never imports Lightning itself.
- :func:`proximal_finetune` really fine-tunes on one subset with GradEx's objective (small problems).
- :func:`compare_with_retraining` computes, on held-out subsets, the LDS and residual error of
  GradEx->KernelSurrogate, GradEx->LinearSurrogate, Real->KernelSurrogate and
  Real->LinearSurrogate, and GradEx's relative error against the real F(s) (paper Tables 2 and 3).

Sign convention as everywhere: F is a loss (lower is better).
"""

from ..quality import heldout_scores
from .compare import compare_with_retraining
from .finetune import proximal_finetune
from .runner import RetrainResult, retrain_subsets
from .train_fn import LightningTrainFn, select_samples

__all__ = [
    "RetrainResult",
    "retrain_subsets",
    "LightningTrainFn",
    "select_samples",
    "heldout_scores",
    "compare_with_retraining",
    "proximal_finetune",
]
