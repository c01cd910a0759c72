"""W0, the snapshot the harvest linearizes around: reading it from a checkpoint safely, and finding
it again on resume by its identity (absolute path and SHA-256), never by taking a new one.

A resumed run whose W0 file cannot be found, or whose file has another content, fails with
:class:`MissingSnapshotError` / :class:`SnapshotMismatchError`: a snapshot of the trained weights
would silently change every score.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Optional

import torch

__all__ = ["MissingSnapshotError", "SnapshotMismatchError", "file_sha256", "weights_from_file", "find_w0",
           "checkpoint_weights", "parse_snapshot", "check_finite_w0"]


class MissingSnapshotError(FileNotFoundError):
    """A resumed run's W0 file is nowhere to be found (moved run directory, other node, other cwd)."""


class SnapshotMismatchError(ValueError):
    """A file at W0's place holds other weights than the W0 this run's harvest was made with."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def weights_from_file(path: str, what: str = "W0 file") -> dict:
    """``{name: tensor}`` from a ``w0.pt`` or a Lightning checkpoint, loaded with ``weights_only=True``
    (no pickled code runs); a checkpoint's ``state_dict`` is taken, non-tensors are dropped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError names the type that weights_only refused
        raise ValueError(
            f"{what} {path!r} cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); lightning-ksm never unpickles arbitrary objects. "
            "Save the weights alone: torch.save({'state_dict': model.state_dict()}, path)"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path!r} holds no state_dict")
    return {n: t for n, t in state.items() if isinstance(t, torch.Tensor)}


def checkpoint_weights(path: str, model, param_names: list) -> dict:
    """W0 from ``snapshot=<checkpoint>``: the selected parameters present, with the model's shapes."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"snapshot checkpoint {path!r} does not exist (snapshot= expects 'fit_start', "
                                "'epoch:N' or a path)")
    state = weights_from_file(path, "snapshot checkpoint")
    own = dict(model.named_parameters())
    missing = [n for n in param_names if n not in state]
    if missing:
        raise ValueError(f"snapshot checkpoint {path!r} lacks parameter(s) {missing[:5]}")
    bad = [n for n in param_names if tuple(state[n].shape) != tuple(own[n].shape)]
    if bad:
        raise ValueError(f"snapshot checkpoint {path!r} has other shapes for parameter(s) {bad[:5]}")
    return {n: t.detach().to("cpu", copy=True) for n, t in state.items()}


def check_finite_w0(state: dict, names: Iterable[str], snapshot: str) -> None:
    """Raise unless W0's linearized parameters ``names`` are finite: GradEx linearizes around W0, and a
    NaN or inf there surfaces much later (or never) as a failure that names no parameter."""
    bad = [n for n in names if n in state and not bool(torch.isfinite(state[n]).all())]
    if not bad:
        return
    epoch = parse_snapshot(snapshot)
    if epoch is None:
        where, fix = f"the snapshot checkpoint {snapshot!r}", "Take W0 from a checkpoint whose weights are finite"
    elif epoch == 0:
        where = "the model's weights at the start of fit"
        fix = "Fix the initialization (or the weights loaded into the model) so that every parameter is finite"
    else:
        where = f"the weights at the start of epoch {epoch}"
        fix = "Training diverged before the snapshot: fix the training or take W0 earlier (snapshot=)"
    names_text = ", ".join(map(repr, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise ValueError(f"TaskAttribution: W0 ({where}) holds NaN or inf in parameter(s) {names_text}; GradEx "
                     f"linearizes around W0 and cannot use them. {fix}")


def find_w0(candidates: Iterable[Optional[str]], sha256: Optional[str]) -> str:
    """The first existing candidate path whose content has ``sha256`` (any existing one when the
    checkpoint recorded no hash). Raises MissingSnapshotError / SnapshotMismatchError."""
    tried, mismatched = [], []
    for path in candidates:
        if not path or path in tried:
            continue
        tried.append(path)
        if not os.path.isfile(path):
            continue
        if sha256 is None or file_sha256(path) == sha256:
            return path
        mismatched.append(path)
    ident = f"sha256 {sha256[:12]}..." if sha256 else "no recorded hash"
    if mismatched:
        raise SnapshotMismatchError(
            f"TaskAttribution: the W0 file {mismatched[0]} differs from the W0 this run was harvested with ({ident}); "
            "its scores would change silently. Restore the original w0.pt or start a new run"
        )
    raise MissingSnapshotError(
        f"TaskAttribution: the resumed run's W0 snapshot ({ident}) was not found; looked at {tried}. W0 is never "
        "re-taken from trained weights. Pass dirpath= pointing at the run directory that holds its w0.pt "
        "(e.g. after moving the run or resuming on another node), or start a new run"
    )


def parse_snapshot(snapshot: str) -> Optional[int]:
    """The epoch of ``snapshot="fit_start"`` (0) or ``"epoch:N"`` (N); None for a checkpoint path."""
    if not isinstance(snapshot, str):
        raise ValueError(f"snapshot must be 'fit_start', 'epoch:N' or a checkpoint path, got {snapshot!r}")
    if snapshot == "fit_start":
        return 0
    if snapshot.startswith("epoch:"):
        try:
            epoch = int(snapshot.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"snapshot 'epoch:N' needs an integer N, got {snapshot!r}") from None
        if epoch < 0:
            raise ValueError(f"snapshot epoch must be >= 0, got {epoch}")
        return epoch
    return None  # a checkpoint path
