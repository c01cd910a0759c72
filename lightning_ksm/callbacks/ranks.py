"""DDP agreement for the callbacks: every rank enters every collective, and all ranks leave a step
the same way.

A collective entered by only some ranks waits forever (or until the process group's timeout): a
rank that raised before a barrier leaves the others in it. So each collective step runs its local
work through :func:`on_all_ranks`, which catches the local failure, gathers every rank's outcome
in one collective that every rank enters, and then raises on every rank if any rank failed. The
ranks also compare at train start what they read (:func:`check_same_data`): the harvest shards
each loader's dataset across the ranks by index, so every rank must see the same data, and DDP
steps the ranks together, so every rank must have as many training batches.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["RankFailedError", "gather", "on_all_ranks", "check_same_data", "is_io_failure"]


class RankFailedError(RuntimeError):
    """Another DDP rank failed in the same step (its own error is in the message and its log).

    ``io``: whether every failing rank failed to read or write a file (an ``OSError``)."""

    def __init__(self, message: str, *, rank: int, io: bool) -> None:
        super().__init__(message)
        self.rank, self.io = rank, io


def is_io_failure(exc: BaseException) -> bool:
    """A failed read or write (a full disk, a quota, a lost mount), here or on another rank."""
    return isinstance(exc, OSError) or (isinstance(exc, RankFailedError) and exc.io)


def gather(obj: Any, world: Optional[int] = None) -> list:
    """``obj`` of every rank, in rank order (one ``all_gather_object``); ``[obj]`` without DDP.
    ``world``: the trainer's world size (None: the default process group's, if there is one)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def on_all_ranks(fn: Callable[[], Any], *, what: str, world: Optional[int] = None) -> Any:
    """Run ``fn()`` here, then learn every rank's outcome (one collective); returns ``fn()``'s result.

    If any rank failed, every rank raises: a rank that failed raises its own error, the others a
    :class:`RankFailedError` that names the failing rank and its error. A failure that is an
    ``OSError`` on every failing rank is one everywhere (:func:`is_io_failure`), so that all ranks
    take the same way out.
    """
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
        error = exc
    mine = None if error is None else (type(error).__name__, str(error)[:2000], isinstance(error, OSError))
    failed = [(rank, f) for rank, f in enumerate(gather(mine, world)) if f is not None]
    if not failed:
        return result
    io = all(f[2] for _, f in failed)
    if error is not None and (io or not isinstance(error, OSError)):
        raise error
    rank, (name, text, _) = next((r, f) for r, f in failed if io or not f[2])
    raise RankFailedError(f"{what} failed on DDP rank {rank} ({name}: {text})", rank=rank, io=io) from error


BATCHES = "training batches per epoch"  # the key of the batch count in the facts


def check_same_data(trainer, fingerprints: dict) -> None:
    """Every rank's number of training batches and ``fingerprints`` (``{loader description: (samples,
    digest of its labels and task ids)}``) are the same, or ``ValueError`` names what differs, and the fix."""
    facts = gather({BATCHES: trainer.num_training_batches, **fingerprints}, trainer.world_size)
    differs = [key for key in facts[0] if any(f.get(key) != facts[0][key] for f in facts[1:])]
    problems = []
    if BATCHES in differs:
        counts = ", ".join(f"rank {r}: {f.get(BATCHES)}" for r, f in enumerate(facts))
        problems.append(
            f"the DDP ranks have different numbers of training batches per epoch ({counts}): DDP steps the ranks "
            "together, so the ranks with more batches would wait for the others forever. Give every rank equally "
            "many batches (equal shards, drop_last=True), e.g. with Lightning's distributed sampler "
            "(use_distributed_sampler=True)"
        )
    loaders = [key for key in differs if key != BATCHES]
    if loaders:
        seen = "; ".join(
            f"the {key}: " + ", ".join(f"rank {r}: {_show(f.get(key))}" for r, f in enumerate(facts))
            for key in loaders)
        problems.append(
            f"the DDP ranks see different data ({seen}). The harvest reads each loader's whole dataset by index "
            "and splits its chunks across the ranks, so every rank must hold the same dataset (the same samples "
            "in the same order). With use_distributed_sampler=False, give every rank the whole dataset (the "
            "harvest shards it itself), or pass TaskAttribution(source=..., target=...) DataLoaders over the "
            "same data on every rank"
        )
    if problems:
        raise ValueError("; and ".join(problems))


def _show(fact) -> str:
    return "no such loader" if fact is None else f"{fact[0]} samples (labels and task ids hashed {fact[1][:8]})"
