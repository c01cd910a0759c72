"""Which estimator computes F^(s): the one that follows the recorded run, or the proximal solve."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from ..config import AnalysisConfig
from ..features import HarvestedFeatures
from .checks import describe_divergence
from .estimate import GradExResult, gradex
from .simulate import simulate

__all__ = ["estimate_subsets", "resolve_estimator"]


def resolve_estimator(config: AnalysisConfig, run: Optional[Mapping]) -> str:
    """``"simulate"`` or ``"proximal"`` for ``config.estimator`` (``"auto"``: simulate when a run
    record with optimizer steps is at hand and the run did not diverge, else proximal; the report
    of a diverged run says so first, :func:`.checks.diverged_run_notes`)."""
    kind = config.estimator
    diverged = bool(run and run.get("diverged"))
    if kind == "auto":
        return "simulate" if run and run.get("optimizer") and run.get("steps") and not diverged else "proximal"
    if kind == "simulate" and diverged:
        raise ValueError(
            f'estimator="simulate" follows the recorded training run, but that run diverged '
            f'({describe_divergence(run["diverged"])}): the linearized simulation of a run that diverged is '
            f'not supported. Set estimator="proximal" (lightning-ksm analyze: --estimator proximal) for '
            f"GradEx's proximal solve at W0, or fix the training and train again"
        )
    if kind == "simulate" and not (run and run.get("optimizer") and run.get("steps")):
        raise ValueError(
            'estimator="simulate" follows the recorded training run, but no run record (optimizer and '
            'steps) was given: use the TaskAttribution callback, pass extra_config={"run": {...}}, or '
            'set estimator="proximal"'
        )
    return kind


def estimate_subsets(source: HarvestedFeatures, target: HarvestedFeatures, subsets: np.ndarray,
                     config: AnalysisConfig, *, run: Optional[Mapping] = None,
                     progress: bool = False, batch_seed: int = 0) -> GradExResult:
    """F^(s) for every subset with the estimator ``config`` selects (see :func:`resolve_estimator`).

    ``simulate`` runs the recorded optimizer on the linearized model (:func:`.simulate.simulate`,
    the sample weighting of a run that draws batches from the union of the tasks' data; the exact
    target readout where the features carry it; ``calibrate`` from the observed all-tasks run);
    ``proximal`` is GradEx's converged proximal solve (:func:`.estimate.gradex`, ``lam``,
    ``weighting``). The choice is recorded in ``result.extras["estimator"]``. Features with several
    projection draws (``projection_draws``) are estimated draw by draw and the estimates averaged;
    with ``simulate_batches="run"`` each draw simulates its own batch orders (seeds from
    ``batch_seed`` on), so their noise averages out too.
    """
    kind = resolve_estimator(config, run)
    draws = int(getattr(source, "projection_draws", 1) or 1)
    if draws > 1:  # one estimate per independent projection, averaged
        if getattr(target, "projection_draws", 1) != draws:
            raise ValueError(f"the source features hold {draws} projection draws, the target features "
                             f"{getattr(target, 'projection_draws', 1)}: harvest both with the same projector")
        orders = config.simulate_batch_orders
        parts = [estimate_subsets(source.draw(i), target.draw(i), subsets, config, run=run, progress=progress,
                                  batch_seed=batch_seed + i * orders) for i in range(draws)]
        result = parts[0]
        result.losses = np.mean([p.losses for p in parts], axis=0)
        if result.accuracy is not None:
            result.accuracy = np.mean([p.accuracy for p in parts], axis=0)
        result.extras["projection_draws"] = draws
        for key in ("effect_scale", "all_tasks_change"):  # one entry per draw
            if result.extras.get(key) is not None:
                result.extras[key] = {c: [p.extras[key][c] for p in parts] for c in result.extras[key]}
        return result
    if kind == "simulate":
        result = simulate(source, target, subsets, run, loss=config.loss, adam_as=config.simulate_adam,
                          calibrate=config.calibrate, use_readout=config.target_readout == "exact",
                          batches=config.simulate_batches, batch_orders=config.simulate_batch_orders,
                          batch_seed=batch_seed)
    else:
        result = gradex(source, target, subsets, lam=config.lam, loss=config.loss, weighting=config.weighting,
                        progress=progress)
    result.extras["estimator"] = kind
    return result
