"""Every setting of the pipeline, declared once: its default, its allowed values and its help.

Two settings objects (dataclasses, JSON-able, stored in the report):

- :class:`HarvestConfig`: what is harvested at W0 (parameters, output mode, projection, storage).
- :class:`AnalysisConfig`: what happens after the harvest (subsets, GradEx, surrogate, readouts).

Each field carries its metadata (``help``, a ``check`` and, for choices, ``choices``). The one
``validate()`` of each object runs these checks; the Lightning callback, the command line and the RL
adapter call it when they are constructed, so a bad setting fails before the first training step
with a message that names the setting. The command line builds its options and the docs' option
tables come from the same metadata (:func:`describe`).

This module is a leaf: it imports nothing else of the package, so every layer may use it. The
vocabularies of the engine (output modes, projections, losses, ...) are declared here too.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from math import comb
from typing import Any, Callable, Optional, Sequence, Union

__all__ = [
    "HarvestConfig",
    "AnalysisConfig",
    "describe",
    "check_setting",
    "setting",
    "inherit",
    "OUTPUT_MODES",
    "PROJECTIONS",
    "SEQUENCE_LABELS",
    "LOSSES",
    "WEIGHTINGS",
    "KERNELS",
    "ESTIMATORS",
    "SIMULATE_ADAM",
    "SIMULATE_BATCHES",
    "PRECONDITIONS",
    "CALIBRATIONS",
    "TARGET_READOUTS",
    "JACOBIAN_DTYPES",
    "SUPPORT_MODES",
    "SELECTIONS",
]

OUTPUT_MODES = ("margin", "logits", "regression", "logistic", "sequence")
SEQUENCE_LABELS = ("causal", "aligned")  # output="sequence": how token labels line up with the logits
PROJECTIONS = ("auto", "sjlt", "gaussian", "rademacher", "tensorsketch", "identity", "factorized")
LOSSES = ("cross_entropy", "logistic", "squared")
WEIGHTINGS = ("task", "sample")
KERNELS = ("rbf", "poly", "linear")
ESTIMATORS = ("auto", "simulate", "proximal")
SIMULATE_ADAM = ("auto", "adam", "preconditioned")
SIMULATE_BATCHES = ("full", "run", "reduced")  # every sample; the run's minibatches; those, variance-reduced
GRAD_ENGINES = ("hooks", "vmap")  # how per-sample gradients are formed for a per-sample projection
PRECONDITIONS = ("auto", "none")  # scale gradients by the watched optimizer's second moments (harvest)
CALIBRATIONS = ("effect", "none", "loss")  # free constants taken from the observed all-tasks run
TARGET_READOUTS = ("exact", "projected")  # how GradEx reads the target's first-order loss change
JACOBIAN_DTYPES = ("float32", "float16")
SUPPORT_MODES = ("distance", "size", "none")  # where subset searches may go (readouts/support.py)
SELECTIONS = ("lds", "mse")  # how the kernel surrogate's gamma and alpha are chosen (surrogates.py)


# -- checks: each returns None or raises ValueError("<name> must ..., got ...") ----------------------
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and not isinstance(value, str)
    except (TypeError, ValueError):
        return False


def int_at_least(low: int, *, optional: bool = False) -> Callable:
    def check(name, value):
        if value is None and optional:
            return
        if not _is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")
    check.describe = f"integer >= {low}" + (", or None" if optional else "")
    return check


def positive_number(*, optional: bool = False) -> Callable:
    def check(name, value):
        if value is None and optional:
            return
        if not _is_number(value) or float(value) <= 0:
            raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")
    check.describe = "number > 0" + (", or None" if optional else "")
    return check


def open_fraction(high: float = 1.0) -> Callable:
    def check(name, value):
        if not _is_number(value) or not 0 < float(value) < high:
            raise ValueError(f"{name} must be a number in (0, {high:g}), got {value!r}")
    check.describe = f"number in (0, {high:g})"
    return check


def one_of(choices: Sequence, *, optional: bool = False, callable_ok: bool = False) -> Callable:
    def check(name, value):
        if value is None and optional:
            return
        if callable_ok and callable(value):
            return
        if value not in choices:
            extra = (" or None" if optional else "") + (" or a callable" if callable_ok else "")
            raise ValueError(f"{name} must be one of {list(choices)}{extra}, got {value!r}")
    check.describe = " | ".join(map(str, choices)) + (" | None" if optional else "") + (" | callable" if callable_ok else "")
    return check


def patterns(name, value):
    if value is None:
        return
    if isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a pattern string or a list of pattern strings, got {value!r}")


patterns.describe = "glob / 're:' regex, or a list of them"


def setting(default: Any, help: str, check: Callable, *, choices: Sequence | None = None) -> Any:
    """A dataclass field with the metadata every layer reads (one declaration per setting)."""
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def inherit(cls, name: str, default: Any = MISSING) -> Any:
    """A field that reuses the declaration (help, check, choices) of ``cls.name``, optionally with
    another default: how an adapter (the RL one) shares a setting without declaring it again."""
    source = next(f for f in fields(cls) if f.name == name)
    if default is MISSING:
        default = source.default if source.default is not MISSING else source.default_factory()
    return field(default=default, metadata=source.metadata)


class _Settings:
    """Shared behaviour of the settings dataclasses."""

    _what = "setting"

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what}(s) {unknown}; known settings: {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, value, *, name: str = "config"):
        """An instance from an instance, a dict of fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)

    def _check_fields(self) -> None:
        for f in fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))


def check_setting(cls, name: str, value) -> None:
    """Check one setting of ``cls`` (e.g. an engine function's argument) with the same message."""
    for f in fields(cls):
        if f.name == name:
            f.metadata["check"](name, value)
            return
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


@dataclass
class HarvestConfig(_Settings):
    """What is harvested at W0: which parameters, which output, which projection, how it is stored."""

    _what = "harvest setting"

    output: Union[str, Callable] = setting(
        "margin", "model output linearized per sample: margin (log-odds of the true class), logits, "
        "regression, logistic, sequence (language models: (batch, T, V) logits and token labels with "
        "-100 where no loss is taken; the per-sample loss is the mean cross-entropy over the sample's "
        "supervised tokens, docs/gradex.md), or a callable fn(outputs, labels) -> one scalar per sample",
        one_of(OUTPUT_MODES, callable_ok=True), choices=OUTPUT_MODES)
    sequence_labels: str = setting(
        "causal", "with output='sequence', how token labels line up with the logits: causal (the logits "
        "at position t predict label t+1, as Hugging Face's causal LMs shift them; labels = input_ids "
        "with -100 on prompt and padding) or aligned (label t belongs to the logits at t)",
        one_of(SEQUENCE_LABELS), choices=SEQUENCE_LABELS)
    projection: str = setting(
        "auto", "random projection of the per-sample gradients: auto (tensorsketch when Linear, GPT-2 "
        "Conv1D and Embedding weights hold at least half of the selected parameters, grad_engine is "
        "hooks and proj_dim >= 1024 is a multiple of 4; factorized when covered Conv2d weights hold at "
        "least half, with hooks; sjlt otherwise; docs/gradex.md), sjlt (sparse sign sketch), gaussian, rademacher, "
        "tensorsketch (a sparse sign sketch with a structured hash: the layer hooks form it from both "
        "sides of each outer product, no per-sample weight gradient; the preconditioner enters as a "
        "rank-one approximation per matrix), identity (no projection: tiny models only), factorized "
        "(per-layer Kronecker projection from one batched backward pass, no per-sample gradients; "
        "proj_dim is then the budget per parameter)", one_of(PROJECTIONS), choices=PROJECTIONS)
    proj_dim: int = setting(1024, "projection dimension k (of each draw); when the selected parameters have "
                            "no more than k x proj_draws entries, their exact gradients are stored instead "
                            "(no projection); for the factorized projection (auto's choice for "
                            "convolution-heavy models) a budget per parameter, one draw: the features are "
                            "wider (31,106 per sample on ResNet-18 at 1024)",
                            int_at_least(1))
    proj_draws: int = setting(
        2, "independent projections of size proj_dim harvested side by side; GradEx estimates with "
        "each and averages (measured: the projection's noise is what limits the estimate; "
        "docs/gradex.md); memory and harvest cost grow with proj_dim x proj_draws", int_at_least(1))
    proj_seed: int = setting(0, "seed of the random projection; with proj_draws > 1 the first draw takes it "
                             "and the others seeds derived from it by a stable hash (no two proj_seed values "
                             "share a draw)", int_at_least(0))
    grad_engine: str = setting(
        "hooks", "how per-sample gradients are formed for sjlt/gaussian/rademacher/tensorsketch/identity: hooks "
        "(layer hooks and one batched backward pass for Linear, Embedding, LayerNorm, BatchNorm, GPT-2 "
        "Conv1D; other parameters, Conv2d weights included, per sample) or vmap (torch.func per "
        "sample, the reference path); the features are the same (docs/gradex.md)", one_of(GRAD_ENGINES), choices=GRAD_ENGINES)
    include: Optional[list] = setting(
        None, "parameter-name patterns to linearize (globs, or 're:' regexes); None: every trainable parameter",
        patterns)
    exclude: Optional[list] = setting(None, "parameter-name patterns to leave out", patterns)
    chunk_size: int = setting(64, "per-sample gradients held in memory at once during the harvest", int_at_least(1))
    harvest_batch_size: Optional[int] = setting(
        None, "samples per stored shard; None: each dataloader's batch size", int_at_least(1, optional=True))
    jacobian_dtype: str = setting("float32", "dtype of the projected Jacobians on disk", one_of(JACOBIAN_DTYPES),
                                  choices=JACOBIAN_DTYPES)
    precondition: str = setting(
        "auto", "auto: with an Adam-type optimizer, scale the gradients by its second moments (at harvest "
        "time) before the projection, so GradEx simulates the run's preconditioned steps; none: plain "
        "gradients; the factorized projection folds a rank-one approximation of it into its factors "
        "(docs/gradex.md)",
        one_of(PRECONDITIONS), choices=PRECONDITIONS)
    exact_readout: int = setting(
        8, "target columns whose loss change GradEx reads exactly, without the projection: one "
        "forward-mode pass over the source data per column (target groups, then 'all'; with more "
        "groups than this, only 'all'); 0: off (docs/gradex.md)", int_at_least(0))

    def validate(self) -> None:
        """Check every setting; raises ValueError naming the first bad one."""
        self._check_fields()

    @property
    def output_name(self) -> str:
        """The output mode's name as stored (``"custom"`` for a callable)."""
        return self.output if isinstance(self.output, str) else "custom"

    def record(self) -> dict:
        """The JSON-able record of these settings (a callable output is recorded as "custom")."""
        data = self.to_dict()
        data["output"] = self.output_name
        return data


@dataclass
class AnalysisConfig(_Settings):
    """Settings of the analysis after the harvest: subsets, GradEx, surrogate, readouts.

    The default ``subset_p`` 0.75 sits between the paper's 0.9 (modular arithmetic) and 0.7 (7 of 10
    RL tasks): subsets stay close to the full mixture, where leave-one-out and interaction readouts
    are evaluated, while every task is still left out often enough.
    """

    _what = "analysis setting"

    # subsets
    n_subsets: int = setting(200, "random task subsets solved by GradEx, the surrogate's training set",
                             int_at_least(10))
    subset_p: float = setting(0.75, "Bernoulli inclusion probability of each task in a subset "
                              "(ignored when subset_size is set)", open_fraction())
    subset_size: Optional[int] = setting(None, "exactly this many tasks per subset, instead of subset_p",
                                         int_at_least(1, optional=True))
    seed: int = setting(0, "seed of subset sampling, the held-out split and the readouts", int_at_least(0))
    # GradEx
    estimator: str = setting(
        "auto", "how F^(s) is estimated: simulate (the recorded run's optimizer, lr schedule and steps "
        "on the linearized model), proximal (the converged proximal solve with lam), auto (simulate "
        "when the run was recorded, e.g. by the callback, else proximal); docs/gradex.md",
        one_of(ESTIMATORS), choices=ESTIMATORS)
    simulate_adam: str = setting(
        "auto", "with estimator=simulate, what an Adam-type optimizer becomes on the projected "
        "parameters: adam (coordinate-wise on z), preconditioned (first-moment descent, for "
        "features harvested with the run's second moments), auto (preconditioned when the features "
        "are, else adam)", one_of(SIMULATE_ADAM), choices=SIMULATE_ADAM)
    simulate_batches: str = setting(
        "full", "with estimator=simulate, the gradients of each simulated step: full (every sample of "
        "the subset: the mean over batch orders, O(n) per step, so O(n^2 / batch) per epoch), run "
        "(minibatches of the run's batch size in seeded shuffled orders, as training draws them: O(n) "
        "per epoch) or reduced (those minibatches with the variance reduced by one full-batch gradient "
        "per epoch, SVRG: estimates what full does, O(n) per epoch); docs/gradex.md",
        one_of(SIMULATE_BATCHES), choices=SIMULATE_BATCHES)
    simulate_batch_orders: int = setting(
        4, "with simulate_batches=run, the batch orders (seeded shuffles) simulated and averaged: one "
        "order is one noisy draw of the run, the mean over several is closer to the mean over batch "
        "orders that full estimates (the cost grows with it; docs/gradex.md)", int_at_least(1))
    target_readout: str = setting(
        "exact", "with estimator=simulate, how the target loss's first-order change is read: exact (the "
        "harvest's exact readout, where it has one: measured better on gentle fine-tuning, worse on long "
        "strong runs, docs/gradex.md) or projected (through the projected target features)",
        one_of(TARGET_READOUTS), choices=TARGET_READOUTS)
    calibrate: str = setting(
        "effect", "with estimator=simulate, the free constant taken from the observed all-tasks run: "
        "effect (scale every estimated change from W0 so the all-tasks estimate matches the observed "
        "all-tasks loss; rankings unchanged), loss (scale the learning rate to match it; changes "
        "rankings, measured worse), none", one_of(CALIBRATIONS), choices=CALIBRATIONS)
    lam: float = setting(1e-3, "ridge strength of the linearized fine-tuning problem (docs/gradex.md)",
                         positive_number())
    loss: Optional[str] = setting(None, "GradEx loss; None: chosen from the harvest's output mode",
                                  one_of(LOSSES, optional=True), choices=LOSSES)
    weighting: str = setting("task", "task: every selected task weighs the same (paper eq. 1); sample: "
                             "every sample does", one_of(WEIGHTINGS), choices=WEIGHTINGS)
    # surrogate
    kernel: str = setting("rbf", "surrogate kernel", one_of(KERNELS + ("polynomial",)), choices=KERNELS)
    gamma: Optional[float] = setting(None, "kernel width (rbf) or scale (poly); None: selected by leave-one-out",
                                     positive_number(optional=True))
    alpha: Optional[float] = setting(None, "kernel ridge regularization; None: selected by leave-one-out",
                                     positive_number(optional=True))
    selection: str = setting(
        "lds", "leave-one-out criterion choosing gamma/alpha: lds (the best LDS up to two standard errors, "
        "then the smallest MSE) or mse (the smallest MSE of unit-variance columns); docs/concepts.md",
        one_of(SELECTIONS), choices=SELECTIONS)
    holdout: float = setting(0.2, "fraction of subsets held out to measure the surrogate's fit (held-out LDS)",
                             open_fraction(0.9))
    # readouts
    ensemble_samples: int = setting(4000, "subsets sampled for the random-ensemble scores", int_at_least(1))
    n_groups: Optional[int] = setting(None, "number of co-training groups; None: about sqrt(K / 2), at least 2",
                                      int_at_least(1, optional=True))
    best_subset_size: Optional[int] = setting(None, "size of the recommended subset per target; None: any size",
                                              int_at_least(1, optional=True))
    max_exact: int = setting(50_000, "search the best subset exhaustively up to this many candidates, "
                             "else by local search", int_at_least(1))
    support: str = setting(
        "distance", "where best subsets and groups are searched: distance (sizes within the fitted "
        "subsets' range and within support_radius of one of them), size (sizes only), none (anywhere)",
        one_of(SUPPORT_MODES), choices=SUPPORT_MODES)
    support_radius: Optional[int] = setting(
        None, "Hamming distance limit of support=distance; None: the largest nearest-neighbour distance "
        "among the fitted subsets", int_at_least(1, optional=True))
    rescore_top: int = setting(5, "best-subset candidates per target re-scored with GradEx (when features "
                               "are available); the recommendation is the one GradEx rates best", int_at_least(1))
    rescore_budget: float = setting(
        0.5, "re-scoring of best-subset candidates runs GradEx on at most this fraction of n_subsets subsets; "
        "targets are taken in order of interest (non-source targets, then 'all', then the source tasks) and "
        "the rest keep the surrogate's recommendation, said in the report's notes", positive_number())
    max_exact_groupings: int = setting(
        2_000_000, "choose co-training groups exhaustively up to this many groupings (K <= 16), else by "
        "local search", int_at_least(1))
    n_bootstrap: int = setting(100, "bootstrap replicates over the fitted subsets for the intervals of every "
                               "score, interaction and recommendation; 0: no intervals", int_at_least(0))
    interval_level: float = setting(0.9, "coverage of the bootstrap intervals", open_fraction())
    # resources
    threads: int = setting(1, "CPU threads (torch and BLAS) of the analysis (GradEx, surrogate, readouts), "
                           "restored afterwards; 0: leave the process's settings (docs/benchmarks.md)",
                           int_at_least(0))

    def validate(self, n_tasks: int | None = None) -> None:
        """Check every setting, and those bounded by the number of source tasks when it is known."""
        self._check_fields()
        if n_tasks is None:
            return
        if n_tasks < 2:
            raise ValueError(f"task attribution needs at least 2 source tasks, the harvest has {n_tasks}")
        for name in ("subset_size", "n_groups", "best_subset_size"):
            value = getattr(self, name)
            if value is not None and value > n_tasks:
                raise ValueError(f"{name} must be between 1 and the number of tasks ({n_tasks}), got {value}")

    def n_possible_subsets(self, n_tasks: int) -> int:
        return comb(n_tasks, self.subset_size) if self.subset_size is not None else 2**n_tasks - 1


def describe(cls) -> list[dict]:
    """One row per setting of ``cls``: name, default, allowed values, help (for the CLI and the docs)."""
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        rows.append({
            "name": f.name,
            "default": default,
            "allowed": getattr(f.metadata["check"], "describe", ""),
            "choices": f.metadata["choices"],
            "help": f.metadata["help"],
        })
    return rows
