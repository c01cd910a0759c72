"""``make demo`` / ``python -m lightning_ksm.demo``: task attribution from one real training run.

A small MLP is fine-tuned with Lightning on the planted multi-task problem of
:mod:`lightning_ksm.demo.planted` (six source tasks with known effects on a held-out target task: a
helper, a label-noise task, a pair that only helps together, two neutral tasks), with the
:class:`~lightning_ksm.TaskAttribution` callback attached. The callback snapshots W0, harvests
per-sample gradients after the first epoch, and after training runs GradEx and the kernel surrogate
and writes the report (JSON, CSV, HTML) to ``--out`` (default ``./demo_output``). The demo prints
the report for the target, then checks it against real retraining (leave-one-out and the planted
pair), which takes a few seconds more (``--no-verify`` skips it). CPU only, about half a minute.

``--synthetic`` runs the older surrogate-only demo instead: a planted loss function over task
subsets, no model and no Lightning.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings

import numpy as np

from .._threads import pinned_threads
from .. import (
    KernelSurrogate,
    LinearSurrogate,
    best_subset,
    ensemble_scores,
    interaction_matrix,
    lds,
    loo_scores,
    sample_subsets,
)
from ..rundir import RunDirectory

__all__ = ["main", "planted_demo", "synthetic_demo"]

TASKS = ["helper-a", "helper-b", "noisy-labels", "pair-left", "pair-right", "neutral-1", "neutral-2", "neutral-3"]


# ---------------------------------------------------------------------------------------------
# The synthetic, surrogate-only demo (--synthetic)


def planted_loss(S: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A planted target loss over task subsets: two helpers, a hurting task, a synergistic pair."""
    S = np.asarray(S, float)
    base = 2.0 - 0.4 * S[:, 0] - 0.3 * S[:, 1] + 0.5 * S[:, 2]
    return base - 0.8 * S[:, 3] * S[:, 4] + 0.02 * rng.normal(size=len(S))


def synthetic_demo(seed: int = 0, n_subsets: int = 40) -> None:
    """Fit linear and kernel surrogates to :func:`planted_loss` on sampled subsets; print readouts."""
    rng = np.random.default_rng(seed)
    K = len(TASKS)
    S = sample_subsets(K, n_subsets, p=0.5, seed=seed, unique=True)
    y = planted_loss(S, rng)
    test = sample_subsets(K, 200, p=0.5, seed=seed + 1)
    truth = planted_loss(test, np.random.default_rng(seed + 2))
    lin = LinearSurrogate().fit(S, y)
    ker = KernelSurrogate().fit(S, y)
    print(f"Synthetic problem: {K} tasks, {n_subsets} sampled subsets, 200 held-out subsets\n")
    print(f"held-out LDS   linear {lds(truth, lin.predict(test)):.3f}   kernel {lds(truth, ker.predict(test)):.3f}")
    print(f"kernel chose gamma={ker.gamma_:.4g}, alpha={ker.alpha_:.3g} by leave-one-out\n")
    loo, ens = loo_scores(ker), ensemble_scores(ker, seed=seed)
    print(f"{'task':<14}{'LOO score':>11}{'ensemble':>11}   (score > 0: the task helps)")
    for k in np.argsort(-ens):
        print(f"{TASKS[k]:<14}{loo[k]:>11.3f}{ens[k]:>11.3f}")
    I = interaction_matrix(ker)
    i, j = np.unravel_index(np.argmin(I), I.shape)
    print(f"\nstrongest synergy: {TASKS[i]} + {TASKS[j]} (interaction {I[i, j]:.3f}; < 0 means synergy)")
    best = best_subset(ker, size=4)
    print(f"best 4-task subset: {', '.join(TASKS[t] for t in best.tasks)} (predicted loss {best.predicted_loss:.3f})")


# ---------------------------------------------------------------------------------------------
# The real demo: Lightning training with the TaskAttribution callback


@contextlib.contextmanager
def _quiet_lightning():
    # Lightning's INFO lines (accelerator summary, tips) and its hints about this tiny setup would
    # bury the demo's own output; real problems still surface as errors. Restored afterwards.
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\..*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


_MARKER = ".lightning-ksm-demo"


def _prepare_out(out: str) -> None:
    """Create the output directory and remove what an earlier demo run left there.

    The callback refuses a directory that holds an earlier run's harvest or W0 (they would be mixed
    with this run's), so the demo clears its own earlier harvest and W0 first (the earlier report
    stays until this run's replaces it). Only
    directories the demo created (they hold a marker file) are cleaned; a non-empty directory
    without the marker is refused.
    """
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, _MARKER)
    if not os.path.exists(marker):
        if os.listdir(out):
            raise SystemExit(f"--out {out} is not empty and was not made by this demo; choose another directory")
        open(marker, "w").close()
    RunDirectory(out).clear(report=False)


def planted_demo(out: str = "demo_output", *, epochs: int = 10, n_subsets: int = 100, seed: int = 0,
                 verify: bool = True, progress: bool | None = None):
    """Train on the planted problem with the callback, print the report, check it by retraining.

    Writes into ``out`` (created; an earlier demo's harvest there is replaced). ``progress``: show
    progress bars (default: when stderr is a terminal). Returns the
    :class:`~lightning_ksm.AttributionReport`.
    """
    import lightning.pytorch  # noqa: F401  (its import sets Lightning's log levels; quiet them after)

    if progress is None:
        progress = sys.stderr.isatty()
    out = os.path.abspath(out)
    _prepare_out(out)
    # A tiny model and small matrices: extra torch / BLAS threads only add synchronisation cost (on
    # a busy 2-core machine a 200 x 200 eigh in the surrogate fit became 100x slower).
    with pinned_threads(1), _quiet_lightning():
        return _run(out, epochs=epochs, n_subsets=n_subsets, seed=seed, verify=verify, progress=progress)


def _run(out: str, *, epochs: int, n_subsets: int, seed: int, verify: bool, progress: bool):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    from .. import TaskAttribution
    from .planted import ROLES, SYNERGY_PAIR, TARGET, ground_truth, make_planted_problem, planted_module

    problem = make_planted_problem(seed=seed)
    print("lightning-ksm demo: which training tasks help the target task?\n")
    print(f"Planted problem: {len(problem.task_names)} source tasks x {len(problem.train) // len(problem.task_names)} "
          f"training samples; target task '{TARGET}' (validation only). By construction:")
    for task in problem.task_names:
        print(f"  {task:<10} {ROLES[task]}")
    print(f"\nFine-tuning an MLP (W0: pretrained hidden layer, zero head) for {epochs} epochs with "
          "TaskAttribution attached ...", flush=True)

    L.seed_everything(seed, verbose=False)
    callback = TaskAttribution(n_subsets=n_subsets, seed=seed, dirpath=out, progress=progress)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=CSVLogger(out, name="lightning_logs"),
        enable_progress_bar=progress, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=5, accelerator="cpu", devices=1,
    )
    start = time.perf_counter()
    trainer.fit(planted_module(problem, seed=seed), problem.train_loader(seed=seed), problem.val_loader())
    elapsed = time.perf_counter() - start
    if callback.report is None:
        raise RuntimeError(f"the analysis failed: {callback.analysis_error}")
    report = callback.report
    val_target = trainer.callback_metrics.get("val_target_loss")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items())
    print(f"done in {elapsed:.1f} s ({timing}); target validation loss after training: "
          f"{float(val_target):.3f} (log 2 = 0.693 at W0)\n")

    print(report.to_text(max_rows=None, targets=[TARGET]))

    if verify:
        print("Checking against real retraining from W0 (leave-one-out, and leaving out the pair) ...", flush=True)
        start = time.perf_counter()
        truth = ground_truth(problem, pairs=[SYNERGY_PAIR], with_alone=False, epochs=epochs, seed=seed)
        t = report.target_index(TARGET)
        print(f"  {'task':<10}{'predicted':>11}{'retrained':>11}   (leave-one-out: target loss increase "
              "when the task is removed)")
        for task, _ in report.ranked(TARGET, "loo"):
            pred = report.scores["loo"][report.task_index(task), t]
            print(f"  {task:<10}{pred:>+11.3f}{truth.loo[task]:>+11.3f}")
        pair = " + ".join(SYNERGY_PAIR)
        print(f"  interaction {pair}: predicted {report.interaction(*SYNERGY_PAIR, target=TARGET):+.3f}, "
              f"retrained {truth.interactions[SYNERGY_PAIR]:+.3f} (< 0: synergy)")
        print(f"  ({len(problem.task_names) + 2} retrainings, {time.perf_counter() - start:.1f} s; "
              "the report itself needed none)\n")

    def shown(path: str) -> str:
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel

    print(f"Report: {shown(os.path.join(callback.report_dir, 'report.html'))} (open it in a browser)")
    print(f"        report.json, scores.csv, interactions.csv, ... are in {shown(callback.report_dir)}")
    print(f"Print it again:      lightning-ksm show {shown(out)} --target {TARGET}")
    print("Re-analyse the saved harvest with other settings (no model, no training):")
    print(f"                     lightning-ksm analyze {shown(out)} --n-subsets 400")
    return report


def main(argv=None) -> None:
    """Command-line entry point (``python -m lightning_ksm.demo --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ksm.demo",
        description="lightning-ksm demo: train on a planted multi-task problem with the TaskAttribution "
                    "callback and print the attribution report.",
    )
    parser.add_argument("--out", default="demo_output", help="output directory (default: ./demo_output)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--n-subsets", type=int, default=100, help="task subsets solved by GradEx (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-verify", action="store_true", help="skip the check against real retraining")
    parser.add_argument("--synthetic", action="store_true",
                        help="run the surrogate-only demo on a synthetic loss function instead")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.n_subsets < 10:
        parser.error(f"--n-subsets must be >= 10, got {args.n_subsets}")
    if args.synthetic:
        synthetic_demo(seed=args.seed)
        return
    planted_demo(args.out, epochs=args.epochs, n_subsets=args.n_subsets, seed=args.seed, verify=not args.no_verify)
