"""Ground truth by real retraining: train on task subsets, record F(s), and score estimates against it.

An attribution method is only as good as its agreement with what really happens when you retrain.
This module makes that measurable:

- :func:`retrain_subsets` really trains one model per task subset with a user function
  ``train_fn(subset, seed) -> {target_name: loss}`` and records F(s) for every target group. It is
  seeded (every subset gets a deterministic seed and fresh global RNG states), resumable (every
  finished subset is a small JSON file in ``directory``; a rerun skips those), and runs subsets in
  parallel processes (``n_jobs > 1``, ``spawn`` start method).
- :class:`LightningTrainFn` turns Lightning factories (module, trainer, train loader, evaluation)
  into such a ``train_fn``. This module never imports Lightning itself.
- :func:`compare_with_retraining` computes, on held-out subsets, the LDS and residual error of
  GradEx->KernelSurrogate, GradEx->LinearSurrogate, Real->KernelSurrogate and
  Real->LinearSurrogate, and GradEx's relative error against the real F(s) (paper Tables 2 and 3).

Sign convention as everywhere: F is a loss (lower is better).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from sklearn.base import clone

from ._validation import check_training_subsets
from .metrics import lds, relative_error, residual_error

__all__ = [
    "RetrainResult",
    "retrain_subsets",
    "LightningTrainFn",
    "select_samples",
    "heldout_scores",
    "compare_with_retraining",
    "proximal_finetune",
]

_FILE_FORMAT = "lightning-ksm-retrain-subset"
_FILE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class RetrainResult:
    """Real target losses F(s) of models trained on m task subsets.

    Attributes:
        subsets: ``(m, K)`` bool, the subsets in the order they were given.
        losses: ``(m, T)`` float64, ``losses[i, j]`` = F(subsets[i]) on target group
            ``target_names[j]``.
        target_names: the T target groups (the keys ``train_fn`` returned, in first-seen order).
        seeds: ``(m,)`` the seed each subset was trained with.
        seconds: ``(m,)`` training wall time of each subset as measured when it was trained (also
            for subsets loaded from disk).
        wall_time: seconds this call took (loading + training).
        n_trained: subsets trained by this call; the other ``m - n_trained`` were loaded from disk.
        task_names: the K task names, when given.
    """

    subsets: np.ndarray
    losses: np.ndarray
    target_names: list
    seeds: np.ndarray
    seconds: np.ndarray
    wall_time: float
    n_trained: int
    task_names: Optional[list] = None

    def column(self, name: str) -> np.ndarray:
        """The ``(m,)`` real losses of one target group, by name (e.g. ``"all"``)."""
        try:
            j = self.target_names.index(name)
        except ValueError:
            raise KeyError(f"no target group {name!r}; groups are {self.target_names}") from None
        return self.losses[:, j]

    @property
    def training_seconds(self) -> float:
        """Total training time summed over subsets (the cost of the ground truth on one core)."""
        return float(np.sum(self.seconds))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_subsets(subsets, task_names) -> np.ndarray:
    S = check_training_subsets(subsets, allow_1d=False)
    if task_names is not None and len(task_names) != S.shape[1]:
        raise ValueError(
            f"subsets has {S.shape[1]} columns but task_names has {len(task_names)} names; one column per task"
        )
    return S


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _subset_seeds(m: int, seed, vary_seed: bool) -> np.ndarray:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    base = int(seed)
    return base + np.arange(m, dtype=np.int64) if vary_seed else np.full(m, base, dtype=np.int64)


def _check_losses(out, index: int) -> dict:
    if not isinstance(out, Mapping) or not out:
        raise TypeError(
            f"train_fn must return a non-empty dict {{target_name: loss}}; for subset row {index} it "
            f"returned {type(out).__name__}"
        )
    clean = {}
    for key, value in out.items():
        if not isinstance(key, str):
            raise TypeError(f"train_fn returned a non-string target name {key!r} for subset row {index}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"train_fn returned {value!r} for target {key!r} of subset row {index}; losses must be numbers"
            ) from None
        if not math.isfinite(v):
            raise ValueError(
                f"training on subset row {index} gave a non-finite loss {v} for target {key!r} "
                "(diverged?); lower the learning rate or fix the training function"
            )
        clean[key] = v
    return clean


# ---------------------------------------------------------------------------------------------
# One subset: seeded call + atomic file
# ---------------------------------------------------------------------------------------------


def _file(directory: str, index: int) -> str:
    return os.path.join(directory, f"subset-{index:05d}.json")


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _read_record(path: str, index: int, mask: np.ndarray, seed: int) -> Optional[dict]:
    """The stored record of subset ``index``, or None when there is none; raises when the file
    belongs to another subset or seed (a directory reused for another design)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable retraining record ({exc}); delete it to retrain that subset") from None
    if rec.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path} is not a lightning-ksm retraining record; use an empty directory")
    stored = np.asarray(rec.get("subset", []), dtype=bool)
    if stored.shape != mask.shape or not np.array_equal(stored, mask) or int(rec.get("seed", -1)) != seed:
        raise ValueError(
            f"{path} holds subset row {index} of another design (its subset or seed differs from "
            f"row {index} of this call); use a new directory for new subsets or seeds"
        )
    return rec


def _seeded_call(train_fn, mask: np.ndarray, seed: int) -> dict:
    """Call ``train_fn`` with fresh global RNG states seeded by ``seed``; the caller's states are
    restored afterwards, so serial and parallel runs see the same randomness."""
    import torch

    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return train_fn(mask.copy(), int(seed))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _train_one(train_fn, mask: np.ndarray, seed: int, index: int, directory: Optional[str], task_names) -> dict:
    start = time.perf_counter()
    losses = _check_losses(_seeded_call(train_fn, mask, seed), index)
    rec = {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "index": int(index),
        "subset": mask.astype(int).tolist(),
        "tasks": None if task_names is None else [task_names[t] for t in np.flatnonzero(mask)],
        "seed": int(seed),
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }
    if directory is not None:
        _atomic_write_json(_file(directory, index), rec)
    return rec


def _init_worker(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def retrain_subsets(
    train_fn: Callable[[np.ndarray, int], Mapping[str, float]],
    subsets,
    *,
    directory: Optional[str | os.PathLike] = None,
    seed: int = 0,
    vary_seed: bool = False,
    n_jobs: int = 1,
    threads_per_job: Optional[int] = None,
    task_names: Optional[Sequence[str]] = None,
    progress: bool = False,
) -> RetrainResult:
    """Really train one model per task subset and record its target losses F(s).

    Args:
        train_fn: ``train_fn(subset, seed) -> {target_name: loss}``: trains a fresh model (e.g. from
            the snapshot W0) on the tasks where the ``(K,)`` bool ``subset`` is True and returns its
            loss on every target group. Every call must return the same target names. For
            ``n_jobs > 1`` it must be picklable: a module-level function, a ``functools.partial``
            of one, or an instance of a module-level class (e.g. :class:`LightningTrainFn`).
        subsets: ``(m, K)`` 0/1 array; no empty rows.
        directory: where each finished subset is kept as ``subset-00012.json`` (subset, seed,
            losses, seconds). A rerun with the same directory, subsets and seed loads those and
            trains only the missing ones; a file for a different subset or seed raises. ``None``
            keeps nothing on disk.
        seed: base seed. Before each call the global ``random``, ``numpy`` and ``torch`` RNGs are
            seeded with the subset's seed (and restored afterwards), so results do not depend on
            order, resumption or ``n_jobs``.
        vary_seed: False (default): every subset trains with ``seed`` (common random numbers:
            differences between subsets are not blurred by seed noise); True: subset i trains
            with ``seed + i``.
        n_jobs: parallel worker processes (``spawn``); 1 trains in this process.
        threads_per_job: torch threads per worker (default: cores // n_jobs, at least 1).
        task_names: names of the K tasks (recorded in the files; checked against K).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`RetrainResult`.
    """
    start = time.perf_counter()
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable as train_fn(subset, seed), got {type(train_fn).__name__}")
    task_names = None if task_names is None else [str(t) for t in task_names]
    S = _check_subsets(subsets, task_names)
    n_jobs = _check_int("n_jobs", n_jobs, 1)
    if threads_per_job is not None:
        threads_per_job = _check_int("threads_per_job", threads_per_job, 1)
    seeds = _subset_seeds(len(S), seed, vary_seed)
    if directory is not None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)

    records: dict[int, dict] = {}
    if directory is not None:
        for i in range(len(S)):
            rec = _read_record(_file(directory, i), i, S[i], int(seeds[i]))
            if rec is not None:
                records[i] = rec
    todo = [i for i in range(len(S)) if i not in records]
    if todo and n_jobs > 1:
        try:
            pickle.dumps(train_fn)
        except Exception as exc:
            raise TypeError(
                f"n_jobs={n_jobs} sends train_fn to worker processes, but it cannot be pickled ({exc}); "
                "use a module-level function, a functools.partial of one, or n_jobs=1"
            ) from None

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="retrain", unit="subset")
    try:
        if n_jobs == 1 or len(todo) <= 1:
            for i in todo:
                records[i] = _train_one(train_fn, S[i], int(seeds[i]), i, directory, task_names)
                if bar is not None:
                    bar.update(1)
        elif todo:
            import multiprocessing

            threads = threads_per_job or max(1, (os.cpu_count() or 1) // n_jobs)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(n_jobs, len(todo)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(threads,)) as pool:
                futures = {
                    pool.submit(_train_one, train_fn, S[i], int(seeds[i]), i, directory, task_names): i
                    for i in todo
                }
                try:
                    for fut in as_completed(futures):
                        records[futures[fut]] = fut.result()
                        if bar is not None:
                            bar.update(1)
                except BaseException:
                    # do not train the queued subsets after a failure; finished ones are on disk
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()

    names = list(records[0]["losses"])
    for i in range(len(S)):
        keys = list(records[i]["losses"])
        if set(keys) != set(names):
            raise ValueError(
                f"train_fn returned targets {sorted(keys)} for subset row {i} but {sorted(names)} for "
                "row 0; every subset must report the same target groups"
            )
    losses = np.array([[records[i]["losses"][n] for n in names] for i in range(len(S))], dtype=np.float64)
    return RetrainResult(
        subsets=S.copy(),
        losses=losses,
        target_names=names,
        seeds=seeds,
        seconds=np.array([records[i]["seconds"] for i in range(len(S))], dtype=np.float64),
        wall_time=time.perf_counter() - start,
        n_trained=len(todo),
        task_names=task_names,
    )


def select_samples(task_ids, subset, *, task_names: Optional[Sequence] = None) -> np.ndarray:
    """Positions of the samples whose task is selected by ``subset``: the training set of F(s).

    ``task_ids``: ``(n,)`` task index per sample (ints in ``[0, K)``), or task names when
    ``task_names`` gives the column order. ``subset``: ``(K,)`` 0/1. Returns sorted int64 positions.
    """
    mask = np.asarray(subset)
    if mask.ndim != 1 or mask.size == 0 or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"subset must be a non-empty 1-D 0/1 vector, got {np.asarray(subset)!r}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("subset selects no task; every training subset needs at least one task")
    ids = np.asarray(task_ids)
    if task_names is not None:
        names = list(task_names)
        if len(names) != len(mask):
            raise ValueError(f"subset has {len(mask)} entries but task_names has {len(names)}")
        lookup = {n: i for i, n in enumerate(names)}
        unknown = [t for t in ids.tolist() if t not in lookup]
        if unknown:
            raise ValueError(f"task id {unknown[0]!r} is not in task_names {names[:5]}...")
        ids = np.array([lookup[t] for t in ids.tolist()], dtype=np.int64)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError("task_ids must be a 1-D array of integer task indices (or names with task_names=)")
    bad = np.flatnonzero((ids < 0) | (ids >= len(mask)))
    if len(bad):
        raise ValueError(f"task_ids[{int(bad[0])}] = {ids[bad[0]]} is not a column of the subset (K = {len(mask)})")
    return np.flatnonzero(mask[ids]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Lightning adapter (duck-typed: no Lightning import here)
# ---------------------------------------------------------------------------------------------


@dataclass
class LightningTrainFn:
    """A ``train_fn`` for :func:`retrain_subsets` built from Lightning factories.

    Each call builds a fresh module and trainer, fits on the subset's training loader and returns
    ``evaluate(module)``. All four callables must be picklable for ``n_jobs > 1`` (module-level
    functions or ``functools.partial`` of them).

    Attributes:
        make_module: ``make_module(seed) -> LightningModule`` at the starting weights W0.
        make_trainer: ``make_trainer(seed) -> Trainer`` (e.g. ``max_steps``, ``logger=False``,
            ``enable_checkpointing=False``, ``default_root_dir``).
        make_train_loader: ``make_train_loader(subset, seed) -> DataLoader`` over the samples of
            the selected tasks (see :func:`select_samples`).
        evaluate: ``evaluate(module) -> {target_name: loss}`` after training.
    """

    make_module: Callable
    make_trainer: Callable
    make_train_loader: Callable
    evaluate: Callable
    fit_kwargs: dict = field(default_factory=dict)

    def __call__(self, subset: np.ndarray, seed: int) -> dict:
        module = self.make_module(seed)
        trainer = self.make_trainer(seed)
        trainer.fit(module, train_dataloaders=self.make_train_loader(subset, seed), **self.fit_kwargs)
        module.eval()
        return dict(self.evaluate(module))


# ---------------------------------------------------------------------------------------------
# Scoring estimates against the ground truth
# ---------------------------------------------------------------------------------------------


def _as_2d(name: str, arr, m: int) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != m:
        raise ValueError(f"{name} must have shape ({m},) or ({m}, T) (one row per subset), got {np.shape(arr)}")
    if not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite value at index {idx}")
    return a


def heldout_scores(estimator, S_fit, y_fit, S_eval, y_true, *, y_own=None) -> dict:
    """Fit a clone of ``estimator`` on ``(S_fit, y_fit)``; score its predictions on ``S_eval``
    against ``y_true``: ``{"lds", "residual_error"}`` (means over target columns).

    With ``y_own`` (the held-out values of the same kind as ``y_fit``, e.g. GradEx's F^ when the
    surrogate was fitted on F^) also ``"lds_own"`` and ``"residual_error_own"``: how well the
    surrogate models what it was fitted on, apart from how well that agrees with ``y_true``.
    Kernel surrogates also report the chosen ``gamma`` and ``alpha``.
    """
    model = clone(estimator).fit(S_fit, y_fit)
    pred = np.asarray(model.predict(S_eval)).reshape(np.shape(y_true))
    out = {"lds": float(lds(y_true, pred)), "residual_error": float(residual_error(y_true, pred))}
    if y_own is not None:
        out["lds_own"] = float(lds(y_own, pred))
        out["residual_error_own"] = float(residual_error(y_own, pred))
    for attr in ("gamma_", "alpha_"):
        if hasattr(model, attr):
            out[attr.rstrip("_")] = float(getattr(model, attr))
    return out


def _index(name: str, idx, m: int) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (m,):
            raise ValueError(f"{name} as a boolean mask needs shape ({m},), got {arr.shape}")
        arr = np.flatnonzero(arr)
    if arr.ndim != 1 or (len(arr) and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be row indices (ints) or a boolean mask over the {m} subsets")
    bad = np.flatnonzero((arr < 0) | (arr >= m))
    if len(bad):
        raise ValueError(f"{name}[{int(bad[0])}] = {arr[bad[0]]} is not a subset row (there are {m})")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} repeats a subset row")
    return arr.astype(np.int64)


def compare_with_retraining(
    subsets,
    real,
    estimate,
    *,
    fit=None,
    heldout=None,
    n_fit: Optional[int] = None,
    surrogates: Optional[Mapping[str, object]] = None,
) -> dict:
    """Score GradEx and surrogates against really retrained F(s) on held-out subsets.

    Args:
        subsets: ``(m, K)`` 0/1 subsets that were both retrained and estimated.
        real: ``(m,)`` or ``(m, T)`` real losses F(s) (e.g. ``RetrainResult.losses``).
        estimate: the same shape: GradEx's F^(s) on the same subsets and target columns.
        fit, heldout: row indices (or boolean masks) of the subsets used to fit the surrogates
            and of those they are scored on. Default: the first ``n_fit`` rows fit, the rest are
            held out (``n_fit`` defaults to 80% of m, the paper's 40 of 50).
        surrogates: ``{name: estimator}``; default ``{"kernel": KernelSurrogate(),
            "linear": LinearSurrogate()}``. Each is cloned per fit.

    Returns:
        A dict with, for every surrogate ``name``:

        - ``"gradex_<name>"``: fitted on GradEx's F^ of the fit rows, scored against the **real**
          F of the held-out rows (what a user of the method gets);
        - ``"real_<name>"``: fitted on the real F of the fit rows, scored against the real F of the
          held-out rows (the surrogate's own ceiling, with m retrainings);

        each ``{"lds", "residual_error", ...}`` against the real held-out F (the GradEx-fitted ones
        also ``"lds_own"`` / ``"residual_error_own"`` against GradEx's own held-out F^: the
        surrogate's fit apart from GradEx's error); and ``"gradex"``: GradEx itself against the real F,
        ``lds_heldout`` (Spearman on the held-out rows), ``lds_all`` (all rows),
        ``relative_error_median`` / ``relative_error_mean`` (|F^ - F| / |F| over all rows and
        columns, paper Table 2); plus ``n_fit``, ``n_heldout``, ``n_targets``.
    """
    from .surrogates import KernelSurrogate, LinearSurrogate

    S = np.asarray(subsets)
    if S.ndim != 2:
        raise ValueError(f"subsets must be a 2-D (m, K) 0/1 array, got shape {S.shape}")
    S = _check_subsets(S, None).astype(np.float64)
    m = len(S)
    F = _as_2d("real", real, m)
    E = _as_2d("estimate", estimate, m)
    if F.shape != E.shape:
        raise ValueError(f"real has shape {np.shape(real)} but estimate has {np.shape(estimate)}; they must match")
    if fit is None and heldout is None:
        n_fit = int(round(0.8 * m)) if n_fit is None else _check_int("n_fit", n_fit, 2)
        fit_idx, ho_idx = np.arange(n_fit), np.arange(n_fit, m)
    else:
        if n_fit is not None:
            raise ValueError("give either n_fit or fit/heldout row indices, not both")
        fit_idx = _index("fit", fit, m) if fit is not None else None
        ho_idx = _index("heldout", heldout, m) if heldout is not None else None
        if fit_idx is None:
            fit_idx = np.setdiff1d(np.arange(m), ho_idx)
        if ho_idx is None:
            ho_idx = np.setdiff1d(np.arange(m), fit_idx)
        overlap = np.intersect1d(fit_idx, ho_idx)
        if len(overlap):
            raise ValueError(f"subset row {int(overlap[0])} is both in fit and in heldout; held-out rows must be unseen")
    if len(fit_idx) < 2:
        raise ValueError(f"need at least 2 subsets to fit the surrogates, got {len(fit_idx)}")
    if len(ho_idx) < 2:
        raise ValueError(f"need at least 2 held-out subsets to score (LDS is a rank correlation), got {len(ho_idx)}")
    if surrogates is None:
        surrogates = {"kernel": KernelSurrogate(), "linear": LinearSurrogate()}

    out: dict = {}
    Sf, Sh, Fh = S[fit_idx], S[ho_idx], F[ho_idx]
    for name, est in surrogates.items():
        out[f"gradex_{name}"] = heldout_scores(est, Sf, E[fit_idx], Sh, Fh, y_own=E[ho_idx])
        out[f"real_{name}"] = heldout_scores(est, Sf, F[fit_idx], Sh, Fh)
    out["gradex"] = {
        "lds_heldout": float(lds(Fh, E[ho_idx])),
        "lds_all": float(lds(F, E)),
        "relative_error_median": relative_error(E, F, reduce="median"),
        "relative_error_mean": relative_error(E, F, reduce="mean"),
    }
    out["n_fit"], out["n_heldout"], out["n_targets"] = int(len(fit_idx)), int(len(ho_idx)), int(F.shape[1])
    return out


def proximal_finetune(model, w0, inputs, labels, task_ids, subset, *, n_tasks: int, lam: float, steps: int, lr: float):
    """Really fine-tune ``model`` from the weights ``w0`` (a name -> tensor dict) on one task subset.

    The objective is GradEx's (paper eq. 1 with the proximal term of eq. 9): every selected task's
    mean cross-entropy, averaged over the selected tasks, plus ``lam/2 |W - W0|^2``; full-batch Adam
    with a cosine schedule. The model's own parameters are not touched (the weights are passed
    functionally). Returns the fine-tuned weights as a dict. This is ground truth for small problems.
    """
    import torch
    from torch.func import functional_call

    counts = torch.bincount(task_ids, minlength=n_tasks).float()
    s = torch.as_tensor(subset, dtype=torch.float32)
    weight = (s / (s.sum() * counts))[task_ids]
    params = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        out = functional_call(model, params, (inputs,))
        per_sample = torch.nn.functional.cross_entropy(out, labels, reduction="none")
        prox = sum(((params[k] - w0[k]) ** 2).sum() for k in w0)
        ((weight * per_sample).sum() + 0.5 * lam * prox).backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in params.items()}
