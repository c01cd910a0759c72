"""Per-sample outputs f0(x) and projected Jacobians at the snapshot weights W0.

GradEx linearizes the model around W0: ``f_W(x) ~ f0(x) + <grad_W f0(x), W - W0>``, restricted to
the selected parameters and, after a random projection P, ``f0(x) + <P grad f0(x), Z>`` with Z in
R^k. A :class:`Harvester` computes, for every sample of a batch, ``f0(x)`` and ``P grad f0(x)``
with one of three engines: :mod:`.layerwise` (the default: layer hooks on one batched backward pass,
per-sample gradients one layer at a time), :mod:`.engine` (``torch.func`` per sample: the reference,
and the fallback for parameters the hooks do not cover) or :mod:`.factorized` (its own projection);
it is set up once per harvest (parameter selection, projector check, W0
tensors on the device) and then fed batches. Nothing about the model is changed: it is put in eval
mode while a harvest runs and restored afterwards; parameters, ``.grad``, ``requires_grad`` and the
torch RNG state are left as they were.

Output modes (what ``f`` is, :mod:`.outputs`):

- ``"margin"`` (default): the log-odds of the true class, ``z_y - logsumexp_{j != y} z_j`` from the
  logits ``z``; stored label 1.0. The cross-entropy is exactly ``log(1 + exp(-margin))``.
- ``"logits"``: the vector of C logits; label = class index; Jacobian ``(C, k)``.
- ``"regression"``: the scalar output (squared loss downstream); float labels.
- ``"logistic"``: the single logit of a binary classifier; labels in {0, 1}.
- ``"sequence"``: a language model's ``(batch, T, V)`` logits with token labels ``(batch, T)``, -100
  where no loss is taken (``sequence_labels``: causal shift or aligned); one row per sample, the
  margin ``-log(expm1(L))`` of its mean token cross-entropy L, so that its logistic loss is L (stored
  label 1.0; docs/gradex.md says why one row per sample).
- a callable ``fn(outputs, labels) -> (batch,)`` scalar per sample (mode ``"custom"``); it receives
  the model outputs and labels with their batch dimension.

:func:`harvest` runs a Harvester over an iterable of batches and returns the features in memory;
the streaming harvest of dataloaders into a :class:`~lightning_ksm.store.FeatureStore` (resume,
DDP sharding) is :class:`~lightning_ksm.harvesting.runner.HarvestRunner`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..config import GRAD_ENGINES, OUTPUT_MODES, HarvestConfig
from ..features import HarvestedFeatures
from ..task_ids import canonical_task_names, dedup_positions, normalize_task_id
from .engine import Engine, prepare_tensor, tree_leaves, tree_map
from .factorized import FactorizedEngine
from .hooks import HookCoverageError, covered_parameters
from .layerwise import LayerwiseEngine
from .outputs import SequenceMode, check_labels, check_outputs, check_sequence_labels, stored_labels
from .params import select_parameters
from .projection import IdentityProjector, Projector

__all__ = ["Harvester", "BatchFeatures", "harvest", "exact_gradients", "uncompiled", "MODES", "DEFAULT_CHUNK_SIZE"]

MODES = OUTPUT_MODES
DEFAULT_CHUNK_SIZE = HarvestConfig.chunk_size


@dataclass
class BatchFeatures:
    """The harvest of one batch: rows in batch order, task ids as positions in ``task_values``."""

    outputs: np.ndarray
    jacobians: np.ndarray
    labels: np.ndarray
    task_values: list
    task_ids: np.ndarray
    index: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.outputs)


def _unpack_batch(batch, batch_index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (3, 4):
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise TypeError(
            f"batch {batch_index} must be a tuple (inputs, labels, task_ids) or "
            f"(inputs, labels, task_ids, sample_index); got {what}"
        )
    inputs, labels, task_ids = batch[:3]
    index = batch[3] if len(batch) == 4 else None
    leaves = list(tree_leaves(inputs))
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



@contextlib.contextmanager
def uncompiled(model: nn.Module):
    """The original forward pass of every ``torch.compile``d part of ``model`` while the harvest runs.

    A compiled graph is built for training's forward and backward; the harvest's passes (hooks on
    inner layers, a backward pass that keeps its graph, ``torch.func`` transforms) are not what it was
    compiled for, and AOTAutograd's donated buffers refuse a retained graph. Covered: a compiled
    submodule (``torch.compile(net)``, its ``_orig_mod``), ``module.compile()`` and Lightning's
    compiled LightningModule (``trainer.fit(torch.compile(module))``, its ``_compiler_ctx``)."""
    restore = []
    for m in model.modules():
        ctx = getattr(m, "_compiler_ctx", None)
        original = ctx.get("original_forward") if isinstance(ctx, dict) else None
        if original is None and isinstance(getattr(m, "_orig_mod", None), nn.Module):
            original = m._orig_mod.__call__
        if original is not None and "forward" in vars(m):
            restore.append((m, "forward", vars(m)["forward"]))
            m.forward = original
        if getattr(m, "_compiled_call_impl", None) is not None:
            restore.append((m, "_compiled_call_impl", m._compiled_call_impl))
            m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, attr, value in reversed(restore):
            setattr(m, attr, value)


class Harvester:
    """Computes outputs and projected Jacobians of ``model`` at ``weights``, batch by batch.

    Set up once per harvest: the parameter selection (``params`` / ``include`` / ``exclude``, see
    :func:`~lightning_ksm.harvesting.params.select_parameters`; default: the projector's
    parameters), the check that ``projector`` covers exactly those parameters, and the W0 tensors
    on ``device``. Use :meth:`session` around the calls of :meth:`batch`.

    ``mode``: ``"margin"``, ``"logits"``, ``"regression"``, ``"logistic"``, ``"sequence"`` (with
    ``sequence_labels`` ``"causal"`` or ``"aligned"``) or a callable ``fn(outputs, labels) -> (batch,)``. ``weights``: ``{name: tensor}`` overriding the model's
    parameters/buffers (the W0 snapshot). ``forward_fn(model, inputs) -> outputs``: how to call the
    model. ``chunk_size``: per-sample gradients (for logits: sample-class pairs) held at once.
    ``task_names``: the task order; an id not in it raises (default: the ids seen, sorted).
    ``grad_engine``: how the per-sample gradients are formed for a per-sample projection (sjlt,
    gaussian, ..., identity): ``"hooks"`` (default) from layer hooks and one batched backward pass for the
    layers :mod:`.hooks` covers, the rest per sample; ``"vmap"``: ``torch.func`` per sample for all
    (the reference path). Both give the same features; the factorized projection always uses hooks.
    """

    def __init__(
        self,
        model: nn.Module,
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
        task_names: Sequence | None = None,
        grad_engine: str = "hooks",
        sequence_labels: str = "causal",
    ) -> None:
        if not isinstance(projector, Projector):
            raise TypeError(f"projector must be a Projector (see make_projector), got {type(projector).__name__}")
        if isinstance(mode, str):
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES} or a callable, got {mode!r}")
            self.mode_name = mode
            if mode == "sequence":
                if sequence_labels not in ("causal", "aligned"):
                    raise ValueError(f"sequence_labels must be 'causal' or 'aligned', got {sequence_labels!r}")
                mode = SequenceMode(causal=sequence_labels == "causal")
        elif callable(mode):
            self.mode_name = "custom"
        else:
            raise TypeError(f"mode must be a string or a callable, got {type(mode).__name__}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if params is None and include is None and exclude is None:
            params = projector.names  # default: the parameters the projector was built for
        self.names = select_parameters(model, params=params, include=include, exclude=exclude)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        selected = {n: shapes[n] for n in self.names}
        if selected != projector.param_shapes:
            missing = [n for n in selected if n not in projector.param_shapes]
            extra = [n for n in projector.param_shapes if n not in selected]
            wrong = [n for n in selected if n in projector.param_shapes and projector.param_shapes[n] != selected[n]]
            raise ValueError(
                "the projector was built for other parameters than the selection: selected but not in "
                f"the projector {missing[:5]}, in the projector but not selected {extra[:5]}, shape "
                f"differs {wrong[:5]} (build it with projector_for_model and the same selection)"
            )
        self.param_shapes = selected
        if task_names is not None:
            task_names = [normalize_task_id(t) for t in task_names]
            if len(set(task_names)) != len(task_names):
                raise ValueError(f"task_names contains duplicates: {task_names}")
        self.task_names = task_names
        self._position = None if task_names is None else {t: i for i, t in enumerate(task_names)}
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model, self.mode, self.projector = model, mode, projector
        if grad_engine not in GRAD_ENGINES:
            raise ValueError(f"grad_engine must be one of {GRAD_ENGINES}, got {grad_engine!r}")
        self._engine_args = (model, self.names, mode, projector, weights, forward_fn, self.device, chunk_size)
        with torch.inference_mode(False):  # W0 copies must be usable by autograd even under validate()
            if projector.kind == "factorized":
                self.engine = FactorizedEngine(*self._engine_args)
            elif grad_engine == "hooks" and covered_parameters(model, self.names)[0]:
                # identity too (few parameters: LoRA adapters, a head): the hooks need no per-sample
                # forward pass, which transformers' models do not survive under vmap
                self.engine = LayerwiseEngine(*self._engine_args)
            else:
                self.engine = Engine(*self._engine_args)
        self._n_classes = None
        self._checked = False

    @contextlib.contextmanager
    def session(self):
        """Eval mode, gradients on (also under ``no_grad`` / ``inference_mode``), RNG state kept, the
        model's plain forward pass (:func:`uncompiled`)."""
        training = [(m, m.training) for m in self.model.modules()]
        rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.inference_mode(False), torch.enable_grad(), \
                    uncompiled(self.model):
                yield self
        finally:
            for m, flag in training:
                m.training = flag

    def batch(self, batch, batch_index: int = 0) -> BatchFeatures | None:
        """The features of one ``(inputs, labels, task_ids[, sample_index])`` batch (None if empty)."""
        inputs, labels, task_list, index, n = _unpack_batch(batch, batch_index)
        if self._position is not None:
            unknown = [t for t in task_list if t not in self._position]
            if unknown:
                raise ValueError(
                    f"batch {batch_index}: unknown task id {unknown[0]!r}; task_names are {self.task_names}"
                )
        if n == 0:
            return None
        inputs = tree_map(lambda t: prepare_tensor(t, self.device), inputs)
        labels = prepare_tensor(labels, self.device)
        if not self._checked:  # one cheap batched forward to validate shapes before the per-sample work
            out = self.engine.forward_batch(inputs)
            check_outputs(self.mode_name, out, n, batch_index)
            if self.mode_name in ("margin", "logits"):
                self._n_classes = out.shape[1]
            if self.mode_name == "sequence":
                self._n_classes = out.shape[2]  # the vocabulary
                check_sequence_labels(labels, n, out.shape[1], out.shape[2], self.mode.causal, f"batch {batch_index}")
            self._checked = True
        check_labels(self.mode if self.mode_name in ("custom", "sequence") else self.mode_name, labels, n,
                     self._n_classes, batch_index)
        try:
            try:
                outputs, jac = self.engine.run(inputs, labels, n, self._n_classes, batch_index)
            except HookCoverageError as exc:
                if not isinstance(self.engine, LayerwiseEngine):
                    raise
                # Caught on the first chunk, before anything was returned: these parameters go through the
                # per-sample path instead (same projection, so the features do not change).
                warnings.warn(f"{exc}; they go through the per-sample path instead", stacklevel=2)
                with torch.inference_mode(False):
                    self.engine = LayerwiseEngine(*self._engine_args, uncovered=exc.names, warn=False)
                outputs, jac = self.engine.run(inputs, labels, n, self._n_classes, batch_index)
        except RuntimeError as exc:
            if not str(exc).startswith("vmap:"):
                raise
            raise ValueError(self._vmap_failure(exc)) from exc
        outputs = outputs.detach().cpu().numpy()
        values = self.task_names if self.task_names is not None else canonical_task_names(task_list)
        lookup = {t: i for i, t in enumerate(values)}
        return BatchFeatures(
            outputs=outputs, jacobians=jac.detach().cpu().numpy(),
            labels=stored_labels(self.mode_name, labels, outputs), task_values=list(values),
            task_ids=np.array([lookup[t] for t in task_list], dtype=np.int64), index=index,
        )


    def _vmap_failure(self, exc) -> str:
        """What to do when the model's forward pass does not run under ``vmap`` (e.g. transformers'
        ``.item()`` checks while it builds an SDPA attention mask)."""
        fallback = getattr(self.engine, "fallback_names", None)
        which = (f"the parameters the layer hooks do not cover, {fallback[:5]}," if fallback else
                 "the selected parameters")
        return (f"{which} go through the per-sample torch.func (vmap) path, and this model's forward pass does not "
                f"run under vmap ({str(exc).splitlines()[0][:160]}). Use grad_engine='hooks' (the default) and leave "
                "out the parameters the hooks do not cover with exclude=, or make the forward pass vmap-safe (for "
                "transformers models: attn_implementation='eager' on the model's config)")


def harvest(
    model: nn.Module,
    batches: Iterable,
    *,
    projector: Projector,
    progress: bool = False,
    **options,
) -> HarvestedFeatures:
    """Per-sample outputs f0 and projected Jacobians of ``model`` at weights W0, in memory.

    ``batches``: iterable of ``(inputs, labels, task_ids)`` or ``(inputs, labels, task_ids,
    sample_index)``; inputs a tensor or a dict/list/tuple of tensors with a common batch dim; labels
    a tensor; task ids ints or strings; sample_index optional global sample indices (duplicates are
    dropped, keeping the first, and rows are ordered by index). ``projector``: a
    :class:`~lightning_ksm.harvesting.projection.Projector` over exactly the selected parameters
    (build it with :func:`~lightning_ksm.harvesting.params.projector_for_model`). Every other
    option (``params``, ``include``, ``exclude``, ``mode``, ``weights``, ``forward_fn``,
    ``chunk_size``, ``device``, ``task_names``) is :class:`Harvester`'s.
    """
    harvester = Harvester(model, projector=projector, **options)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="harvest", total=len(batches) if hasattr(batches, "__len__") else None)
    with harvester.session():
        results = [r for b, batch in enumerate(iterator) if (r := harvester.batch(batch, b)) is not None]
    return _assemble(results, harvester.task_names, harvester.mode_name)


def _assemble(results: list, task_names, mode_name: str) -> HarvestedFeatures:
    if not results:
        raise ValueError("harvest received no samples: the batches iterable was empty")
    names = task_names if task_names is not None else canonical_task_names(v for r in results for v in r.task_values)
    position = {t: i for i, t in enumerate(names)}
    task_ids = np.concatenate([np.array([position[v] for v in r.task_values], dtype=np.int64)[r.task_ids]
                               for r in results])
    outputs = np.concatenate([r.outputs for r in results])
    jac = np.concatenate([r.jacobians for r in results])
    labels = np.concatenate([r.labels for r in results])
    has_index = [r.index is not None for r in results]
    if any(has_index):
        if not all(has_index):
            raise ValueError("some batches carry a sample_index and others do not; give it for all or none")
        keep = dedup_positions(np.concatenate([r.index for r in results]))
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
    n = next(iter(tree_leaves(inputs)))[1].shape[0]
    feats = harvest(model, [(inputs, labels, [0] * n)], projector=ident, params=names, mode=mode,
                    weights=weights, forward_fn=forward_fn, chunk_size=chunk_size)
    return feats.outputs, feats.jacobians
