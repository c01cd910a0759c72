"""The retraining runner: train one model per task subset (seeded, resumable, parallel) and record F(s)."""

from __future__ import annotations

import math
import os
import pickle
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .._validation import check_int, check_training_subsets
from .records import new_record, read_record, record_path, write_record

__all__ = ["RetrainResult", "retrain_subsets"]


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
    rec = new_record(index, mask, task_names, seed, losses, time.perf_counter() - start)
    if directory is not None:
        write_record(directory, rec)
    return rec


def _init_worker(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


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
    K = None if task_names is None else len(task_names)
    S = check_training_subsets(subsets, allow_1d=False, n_tasks=K, columns_of=f"task_names has {K} names")
    n_jobs = check_int("n_jobs", n_jobs, 1)
    if threads_per_job is not None:
        threads_per_job = check_int("threads_per_job", threads_per_job, 1)
    seeds = _subset_seeds(len(S), seed, vary_seed)
    if directory is not None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)

    records: dict[int, dict] = {}
    if directory is not None:
        for i in range(len(S)):
            rec = read_record(record_path(directory, i), i, S[i], int(seeds[i]))
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
