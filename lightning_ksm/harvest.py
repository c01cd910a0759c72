"""Harvest per-sample outputs f0(x) and projected Jacobians at the snapshot weights W0.

GradEx linearizes the model around W0: ``f_W(x) ~ f0(x) + <grad_W f0(x), W - W0>``, restricted to
the selected parameters and, after a random projection P, ``f0(x) + <P grad f0(x), Z>`` with Z in
R^k. This module computes, for every sample, ``f0(x)`` and ``P grad f0(x)`` with ``torch.func``
(``functional_call`` + ``vmap(grad)`` for scalar outputs, ``vmap`` of a vector-Jacobian product
over classes for logits), in chunks, so that at most ``chunk_size`` per-sample gradients (each of
size d) exist at any time. Nothing about the model is changed: it is put in eval mode during the
harvest and restored afterwards; parameters, ``.grad``, ``requires_grad`` and the torch RNG state
are left as they were.

Output modes (what ``f`` is):

- ``"margin"`` (default): the log-odds of the true class, ``z_y - logsumexp_{j != y} z_j`` from the
  logits ``z``; stored label 1.0. The cross-entropy is exactly ``log(1 + exp(-margin))``.
- ``"logits"``: the vector of C logits; label = class index; Jacobian ``(C, k)``.
- ``"regression"``: the scalar output (squared loss downstream); float labels.
- ``"logistic"``: the single logit of a binary classifier; labels in {0, 1}.
- a callable ``fn(outputs, labels) -> (batch,)`` scalar per sample (mode ``"custom"``); it receives
  the model outputs and labels with their batch dimension.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from .features import HarvestedFeatures
from .projection import IdentityProjector, Projector, make_projector
from .store import FeatureStore, canonical_task_names, dedup_positions, normalize_task_id

MODES = ("margin", "logits", "regression", "logistic")
DEFAULT_CHUNK_SIZE = 128


# -- parameter selection ---------------------------------------------------------------------
def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_parameters(
    model: nn.Module,
    *,
    params: Sequence[str] | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the parameters to linearize, in ``model.named_parameters()`` order.

    ``params``: explicit names (any parameter, frozen or not). Otherwise every parameter with
    ``requires_grad``, kept if it matches one of ``include`` (default: all) and none of ``exclude``.
    Patterns are shell globs (``"encoder.*.weight"``) or, prefixed with ``"re:"``, regular
    expressions searched in the name (``"re:^blocks\\.[01]\\."``).
    """
    named = dict(model.named_parameters())
    if params is not None:
        if isinstance(params, str):
            params = [params]
        unknown = [p for p in params if p not in named]
        if unknown:
            raise ValueError(f"model has no parameter(s) {unknown[:5]}; known: {list(named)[:10]}")
        if include is not None or exclude is not None:
            raise ValueError("pass either params= (explicit names) or include=/exclude= patterns, not both")
        wanted = set(params)
        return [n for n in named if n in wanted]
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    candidates = [n for n, p in named.items() if p.requires_grad]
    chosen = [
        n
        for n in candidates
        if (include is None or any(_matches(n, pat) for pat in include))
        and not any(_matches(n, pat) for pat in exclude)
    ]
    if not chosen:
        raise ValueError(
            f"no parameter selected (include={include}, exclude={exclude}) among the "
            f"{len(candidates)} trainable parameters, e.g. {candidates[:8]}"
        )
    return chosen


def projector_for_model(
    model: nn.Module,
    kind: str = "sjlt",
    k: int | None = 512,
    seed: int = 0,
    *,
    params: Sequence[str] | None = None,
    include=None,
    exclude=None,
    **opts,
) -> Projector:
    """A projector over the parameters :func:`select_parameters` picks (same arguments)."""
    names = select_parameters(model, params=params, include=include, exclude=exclude)
    shapes = dict(model.named_parameters())
    return make_projector(kind, {n: shapes[n].shape for n in names}, k, seed, **opts)


# -- pytree helpers (dict / list / tuple of tensors) -------------------------------------------
def _tree_leaves(obj, path="inputs"):
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tree_leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tree_leaves(value, f"{path}[{i}]")
    else:
        raise TypeError(
            f"{path} is a {type(obj).__name__}; inputs must be a tensor or dicts/lists/tuples of "
            "tensors (move other values into forward_fn)"
        )


def _tree_map(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    raise TypeError(f"unsupported input type {type(obj).__name__}")


def _prepare_tensor(t: torch.Tensor, device) -> torch.Tensor:
    t = t.to(device)
    if t.is_inference():  # e.g. made under trainer.validate()'s inference_mode
        t = t.clone()
    return t


# -- the functional model ----------------------------------------------------------------------
class _Forward(nn.Module):
    """Wraps ``model`` so that ``functional_call`` swaps its tensors while ``forward_fn`` runs."""

    def __init__(self, model: nn.Module, forward_fn: Callable | None) -> None:
        super().__init__()
        self.model = model
        self._forward_fn = forward_fn

    def forward(self, inputs):
        if self._forward_fn is None:
            return self.model(inputs)
        return self._forward_fn(self.model, inputs)


def _scalarize(mode, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample scalar output ``(batch,)`` of a scalar mode from batched model outputs."""
    if mode == "margin":
        true = outputs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        classes = torch.arange(outputs.shape[1], device=outputs.device)
        mask = classes.unsqueeze(0) == labels.long().unsqueeze(1)
        others = torch.logsumexp(outputs.masked_fill(mask, float("-inf")), dim=1)
        return true - others
    if mode in ("regression", "logistic"):
        return outputs.reshape(outputs.shape[0])
    value = mode(outputs, labels)
    if not isinstance(value, torch.Tensor) or value.numel() != outputs.shape[0]:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"custom mode function must return one scalar per sample, shape ({outputs.shape[0]},); got {got}"
        )
    return value.reshape(outputs.shape[0])


def _check_outputs(mode, outputs, n: int, batch_index: int) -> None:
    where = f"batch {batch_index}"
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"{where}: the model (or forward_fn) must return a tensor, got {type(outputs).__name__}")
    if outputs.dim() == 0 or outputs.shape[0] != n:
        raise ValueError(f"{where}: model output shape {tuple(outputs.shape)} has no batch dim of {n}")
    if mode in ("margin", "logits"):
        if outputs.dim() != 2:
            raise ValueError(
                f"{where}: mode {mode!r} needs model outputs of shape (batch, C), got "
                f"{tuple(outputs.shape)} (use forward_fn to select e.g. the last token's logits)"
            )
        if mode == "margin" and outputs.shape[1] < 2:
            raise ValueError(f"{where}: mode 'margin' needs C >= 2 logits; for one logit use mode='logistic'")
    elif mode in ("regression", "logistic"):
        if not (outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)):
            raise ValueError(
                f"{where}: mode {mode!r} needs one scalar output per sample, shape (batch,) or "
                f"(batch, 1); got {tuple(outputs.shape)}"
            )


def _check_labels(mode, labels: torch.Tensor, n: int, n_classes: int | None, batch_index: int) -> None:
    where = f"batch {batch_index}"
    if callable(mode):
        if labels.dim() == 0 or labels.shape[0] != n:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} need a batch dim of {n}")
        return
    if mode in ("regression", "logistic"):
        if labels.numel() != n:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} need one value per sample ({n})")
    elif labels.shape != (n,):
        raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} must be class indices of shape ({n},)")
    flat = labels.reshape(-1)
    if mode in ("margin", "logits"):
        if labels.is_floating_point():
            bad = torch.nonzero(flat != flat.round()).flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"{where}, sample {i}: label {flat[i].item()} is not a class index")
        bad = torch.nonzero((flat < 0) | (flat >= n_classes)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{where}, sample {i}: label {flat[i].item()} is out of range for {n_classes} classes"
            )
    elif mode == "logistic":
        bad = torch.nonzero((flat != 0) & (flat != 1)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{where}, sample {i}: logistic labels must be 0 or 1, got {flat[i].item()}")
    elif mode == "regression":
        bad = torch.nonzero(~torch.isfinite(flat.double())).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{where}, sample {i}: regression label {flat[i].item()} is not finite")


def _first_nonfinite(t: torch.Tensor) -> int | None:
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    if bad.any():
        return int(torch.nonzero(bad)[0])
    return None


class _Engine:
    """Per-chunk computation of outputs and projected Jacobians for one model and mode."""

    def __init__(self, model, names, mode, projector, weights, forward_fn, device, chunk_size):
        self.mode = mode
        self.projector = projector
        self.names = names
        self.chunk_size = chunk_size
        self.fmodel = _Forward(model, forward_fn)
        tensors = {}
        for n, p in model.named_parameters():
            tensors[n] = p.detach()
        for n, b in model.named_buffers():
            tensors[n] = b.detach()
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"weights must be a dict name -> tensor, got {type(weights).__name__}")
            unknown = [n for n in weights if n not in tensors]
            if unknown:
                raise ValueError(f"weights has entries {unknown[:5]} that are not parameters/buffers of the model")
            for n, w in weights.items():
                w = torch.as_tensor(w)
                if tuple(w.shape) != tuple(tensors[n].shape):
                    raise ValueError(
                        f"weights[{n!r}] has shape {tuple(w.shape)}, the model's has {tuple(tensors[n].shape)}"
                    )
                tensors[n] = w.detach().to(dtype=tensors[n].dtype)
        self.const = {f"model.{n}": t.to(device) for n, t in tensors.items() if n not in names}
        self.sel = {n: tensors[n].to(device) for n in names}

    def call(self, sel: dict, inputs):
        merged = dict(self.const)
        merged.update({f"model.{n}": t for n, t in sel.items()})
        return functional_call(self.fmodel, merged, (inputs,))

    def forward_batch(self, inputs):
        with torch.no_grad():
            return self.call(self.sel, inputs)

    def _sample_scalar(self, sel, x, y):
        xb = _tree_map(lambda t: t.unsqueeze(0), x)
        value = _scalarize(self.mode, self.call(sel, xb), y.unsqueeze(0))[0]
        return value, value.detach()

    def _sample_vector(self, sel, x, basis):
        xb = _tree_map(lambda t: t.unsqueeze(0), x)
        out, pullback = vjp(lambda p: self.call(p, xb)[0], sel)
        (jac,) = vmap(pullback)(basis)
        return jac, out.detach()

    def run(self, inputs, labels, n: int, n_classes: int | None, batch_index: int):
        """Outputs ``(n,)``/``(n, C)`` and projected Jacobians ``(n, k)``/``(n, C, k)`` of one batch."""
        vector = self.mode == "logits"
        if vector:
            per_sample = max(1, self.chunk_size // n_classes)
            class_block = min(n_classes, self.chunk_size)
        else:
            per_sample, class_block = self.chunk_size, None
        outs, jacs = [], []
        for s in range(0, n, per_sample):
            e = min(n, s + per_sample)
            xs = _tree_map(lambda t: t[s:e], inputs)
            if not vector:
                fn = vmap(grad(self._sample_scalar, has_aux=True), in_dims=(None, 0, 0))
                grads, values = fn(self.sel, xs, labels[s:e])
                projected = self.projector.project(grads)
                self._check_finite(values, projected, grads, s, batch_index)
                outs.append(values)
                jacs.append(projected)
                continue
            fn = vmap(self._sample_vector, in_dims=(None, 0, None))
            eye = torch.eye(n_classes, dtype=next(iter(self.sel.values())).dtype, device=labels.device)
            parts = []
            for c0 in range(0, n_classes, class_block):
                grads, values = fn(self.sel, xs, eye[c0: c0 + class_block])
                projected = self.projector.project(grads)
                self._check_finite(values, projected, grads, s, batch_index)
                parts.append(projected)
            outs.append(values)
            jacs.append(torch.cat(parts, dim=1))
        return torch.cat(outs), torch.cat(jacs)

    @staticmethod
    def _check_finite(values, projected, grads, offset, batch_index):
        i = _first_nonfinite(values)
        if i is not None:
            raise ValueError(f"batch {batch_index}, sample {offset + i}: the model output is not finite")
        # A non-finite gradient entry makes its projection non-finite (every coordinate has nonzero
        # weights), so the cheap check is on the k-dim projection; the d-dim scan runs only to
        # name the culprit.
        if _first_nonfinite(projected) is None:
            return
        for name, g in grads.items():
            i = _first_nonfinite(g)
            if i is not None:
                raise ValueError(
                    f"batch {batch_index}, sample {offset + i}: the gradient of parameter {name!r} is not finite"
                )
        i = _first_nonfinite(projected)
        raise ValueError(f"batch {batch_index}, sample {offset + i}: the projected gradient is not finite (overflow)")


def _unpack_batch(batch, batch_index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (3, 4):
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise TypeError(
            f"batch {batch_index} must be a tuple (inputs, labels, task_ids) or "
            f"(inputs, labels, task_ids, sample_index); got {what}"
        )
    inputs, labels, task_ids = batch[:3]
    index = batch[3] if len(batch) == 4 else None
    leaves = list(_tree_leaves(inputs))
    if not leaves:
        raise ValueError(f"batch {batch_index}: inputs contain no tensor")
    n = leaves[0][1].shape[0] if leaves[0][1].dim() else None
    for path, t in leaves:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"batch {batch_index}: {path} has shape {tuple(t.shape)}; every input tensor needs the "
                f"same batch dim ({n})"
            )
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if isinstance(task_ids, torch.Tensor):
        task_list = task_ids.reshape(-1).tolist()
    elif isinstance(task_ids, np.ndarray):
        task_list = task_ids.reshape(-1).tolist()
    elif isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Sequence):
        raise TypeError(f"batch {batch_index}: task_ids must be a tensor or a sequence, got {type(task_ids).__name__}")
    else:
        task_list = list(task_ids)
    if len(task_list) != n:
        raise ValueError(f"batch {batch_index}: {len(task_list)} task ids for {n} samples")
    try:
        task_list = [normalize_task_id(t) for t in task_list]
    except TypeError as exc:
        raise TypeError(f"batch {batch_index}: {exc}") from None
    if index is not None:
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index).reshape(-1)
        if len(index) != n or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"batch {batch_index}: sample_index must hold {n} integers, got {index!r}")
        index = index.astype(np.int64)
    return inputs, labels, task_list, index, n


def harvest(
    model: nn.Module,
    batches: Iterable,
    *,
    projector: Projector,
    params: Sequence[str] | None = None,
    include=None,
    exclude=None,
    mode: str | Callable = "margin",
    weights: Mapping[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device=None,
    store: FeatureStore | str | None = None,
    split: str = "source",
    task_names: Sequence | None = None,
    rank: int = 0,
    progress: bool = False,
) -> HarvestedFeatures | dict:
    """Per-sample outputs f0 and projected Jacobians of ``model`` at weights W0.

    ``batches``: iterable of ``(inputs, labels, task_ids)`` or ``(inputs, labels, task_ids,
    sample_index)``; inputs a tensor or a dict/list/tuple of tensors with a common batch dim; labels
    a tensor; task ids ints or strings; sample_index optional global sample indices (duplicates are
    dropped, keeping the first, and rows are ordered by index).
    ``projector``: a :class:`~lightning_ksm.projection.Projector` over exactly the selected parameters.
    ``params`` / ``include`` / ``exclude``: parameter selection, see :func:`select_parameters`;
    default: the projector's parameters (build it with :func:`projector_for_model`).
    ``mode``: ``"margin"``, ``"logits"``, ``"regression"``, ``"logistic"`` or a callable
    ``fn(outputs, labels) -> (batch,)``.
    ``weights``: ``{name: tensor}`` overriding the model's parameters/buffers (the W0 snapshot).
    ``forward_fn(model, inputs) -> outputs``: how to call the model (default ``model(inputs)``).
    ``chunk_size``: number of per-sample gradients (for logits: sample-class pairs) held at once.
    ``device``: where to compute (default: the model's device).
    ``task_names``: the task order; an id not in it raises. Default: sorted unique ids.
    ``store`` (a :class:`FeatureStore` or a directory): stream each batch into it as shard
    ``(rank, batch_index)`` of ``split``, skip batches already stored (resume: the batches must come
    in the same order; a stored shard with other rows or indices raises), and return a summary dict
    ``{"split", "rows_written", "batches_written", "batches_skipped", "shards", "store"}`` instead of
    the features. Harvest a split in one pass per rank (a second pass with the same rank would be
    taken for a resume).
    """
    if not isinstance(projector, Projector):
        raise TypeError(f"projector must be a Projector (see make_projector), got {type(projector).__name__}")
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or a callable, got {mode!r}")
        mode_name = mode
    elif callable(mode):
        mode_name = "custom"
    else:
        raise TypeError(f"mode must be a string or a callable, got {type(mode).__name__}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    if params is None and include is None and exclude is None:
        params = projector.names  # default: the parameters the projector was built for
    names = select_parameters(model, params=params, include=include, exclude=exclude)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    selected = {n: shapes[n] for n in names}
    if selected != projector.param_shapes:
        missing = [n for n in selected if n not in projector.param_shapes]
        extra = [n for n in projector.param_shapes if n not in selected]
        wrong = [n for n in selected if n in projector.param_shapes and projector.param_shapes[n] != selected[n]]
        raise ValueError(
            "the projector was built for other parameters than the selection: selected but not in "
            f"the projector {missing[:5]}, in the projector but not selected {extra[:5]}, shape "
            f"differs {wrong[:5]} (build it with projector_for_model and the same selection)"
        )
    if task_names is not None:
        task_names = [normalize_task_id(t) for t in task_names]
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names contains duplicates: {task_names}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(store, (str, bytes)) or hasattr(store, "__fspath__"):
        store = FeatureStore(store)
    if store is not None:
        store.initialize(projector_config=projector.config(), mode=mode_name, params=selected, task_names=task_names)

    training = [(m, m.training) for m in model.modules()]
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode(False), torch.enable_grad():
            engine = _Engine(model, names, mode, projector, weights, forward_fn, device, chunk_size)
            return _harvest_loop(engine, batches, mode_name, mode, store, split, task_names, rank, progress, device)
    finally:
        for m, flag in training:
            m.training = flag


def _harvest_loop(engine, batches, mode_name, mode, store, split, task_names, rank, progress, device):
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"harvest {split}", total=len(batches) if hasattr(batches, "__len__") else None)
    position = None if task_names is None else {t: i for i, t in enumerate(task_names)}
    n_classes = None
    checked = False
    results = []  # in-memory: (outputs, jacobians, labels, task_values, local ids, index)
    summary = {"split": split, "rows_written": 0, "batches_written": 0, "batches_skipped": 0, "shards": []}
    for b, batch in enumerate(iterator):
        inputs, labels, task_list, index, n = _unpack_batch(batch, b)
        if position is not None:
            unknown = [t for t in task_list if t not in position]
            if unknown:
                raise ValueError(f"batch {b}: unknown task id {unknown[0]!r}; task_names are {task_names}")
        if store is not None:
            info = store.shard_info(split, (rank, b))
            if info is not None:  # resume: this batch is stored; check that it is the same batch
                stored_index = store.shard_index(split, (rank, b)) if index is not None else None
                if info["rows"] != n or (stored_index is not None and not np.array_equal(stored_index, index)):
                    raise ValueError(
                        f"batch {b}: shard {info['key']!r} of split {split!r} is already stored with "
                        f"other samples ({info['rows']} rows vs {n}); a resumed harvest needs the same "
                        "batches in the same order (no shuffling), or use a new split/store"
                    )
                summary["batches_skipped"] += 1
                continue
        if n == 0:
            continue
        inputs = _tree_map(lambda t: _prepare_tensor(t, device), inputs)
        labels = _prepare_tensor(labels, device)
        if not checked:  # one cheap batched forward to validate shapes before the per-sample work
            out = engine.forward_batch(inputs)
            _check_outputs(mode if mode_name != "custom" else "custom", out, n, b)
            if mode_name in ("margin", "logits"):
                n_classes = out.shape[1]
            checked = True
        _check_labels(mode if mode_name == "custom" else mode_name, labels, n, n_classes, b)
        outputs, jac = engine.run(inputs, labels, n, n_classes, b)
        outputs = outputs.detach().cpu().numpy()
        jac = jac.detach().cpu().numpy()
        if mode_name == "logits":
            stored_labels = labels.cpu().numpy().astype(np.int64)
        elif mode_name == "margin":
            stored_labels = np.ones(n, dtype=outputs.dtype)
        elif mode_name in ("regression", "logistic"):
            stored_labels = labels.detach().cpu().numpy().reshape(n).astype(outputs.dtype)
        else:
            stored_labels = labels.detach().cpu().numpy()
        values = task_names if task_names is not None else canonical_task_names(task_list)
        lookup = {t: i for i, t in enumerate(values)}
        local = np.array([lookup[t] for t in task_list], dtype=np.int64)
        if store is not None:
            store.write_shard(split, (rank, b), outputs=outputs, jacobians=jac, labels=stored_labels,
                              task_ids=local, task_values=values, sample_index=index)
            summary["rows_written"] += n
            summary["batches_written"] += 1
            summary["shards"].append(f"{rank}-{b}")
        else:
            results.append((outputs, jac, stored_labels, values, local, index))
    if store is not None:
        summary["store"] = store.directory
        return summary
    return _assemble(results, task_names, mode_name, engine)


def _assemble(results, task_names, mode_name, engine) -> HarvestedFeatures:
    if not results:
        raise ValueError("harvest received no samples: the batches iterable was empty")
    names = task_names if task_names is not None else canonical_task_names(v for r in results for v in r[3])
    position = {t: i for i, t in enumerate(names)}
    task_ids = np.concatenate([np.array([position[v] for v in r[3]], dtype=np.int64)[r[4]] for r in results])
    outputs = np.concatenate([r[0] for r in results])
    jac = np.concatenate([r[1] for r in results])
    labels = np.concatenate([r[2] for r in results])
    has_index = [r[5] is not None for r in results]
    if any(has_index):
        if not all(has_index):
            raise ValueError("some batches carry a sample_index and others do not; give it for all or none")
        keep = dedup_positions(np.concatenate([r[5] for r in results]))
        outputs, jac, labels, task_ids = outputs[keep], jac[keep], labels[keep], task_ids[keep]
    return HarvestedFeatures(outputs=outputs, jacobians=jac, labels=labels, task_ids=task_ids,
                             task_names=list(names), mode=mode_name)


def exact_gradients(
    model: nn.Module,
    inputs,
    labels,
    *,
    mode: str | Callable = "margin",
    params: Sequence[str] | None = None,
    include=None,
    exclude=None,
    weights: Mapping[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = None,
    chunk_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact, unprojected per-sample outputs and flat gradients, for small models (tests, benchmarks).

    Returns ``(outputs, grads)`` with ``grads`` of shape ``(n, d)`` (``(n, C, d)`` in logits mode),
    the selected parameters flattened and concatenated in ``model.named_parameters()`` order. This
    holds an n x d matrix in memory: never use it on a real model; use :func:`harvest`.
    """
    names = select_parameters(model, params=params, include=include, exclude=exclude)
    shapes = dict(model.named_parameters())
    ident = IdentityProjector({n: shapes[n].shape for n in names})
    n = next(iter(_tree_leaves(inputs)))[1].shape[0]
    feats = harvest(model, [(inputs, labels, [0] * n)], projector=ident, params=names, mode=mode,
                    weights=weights, forward_fn=forward_fn, chunk_size=chunk_size)
    return feats.outputs, feats.jacobians


__all__ = [
    "harvest",
    "exact_gradients",
    "select_parameters",
    "projector_for_model",
    "MODES",
]
