"""The harvest: per-sample outputs and randomly projected Jacobians of a model at W0.

Data flow: :mod:`.batches` (read a user's batches, walk loaders in rank-sharded chunks) ->
:mod:`.params` (which parameters) -> :mod:`.layerwise` on :mod:`.hooks` (the default: layer
hooks on one batched backward pass), or :mod:`.engine` (``torch.func`` per sample), with
:mod:`.outputs` and :mod:`.projection` (:mod:`.sjlt`, :mod:`.tensorsketch`, :mod:`.draws`,
:mod:`.factorized`: per-sample Jacobians, projected) -> :mod:`.harvest` (:class:`Harvester`, :func:`harvest`: features
in memory) or :mod:`.runner` (:class:`HarvestRunner`: shards in a feature store, resumable);
:mod:`.readout` adds the exact target readout to the source shards (GradEx's first-order target
change without the projection) and the watched optimizer's preconditioner.
"""

from .batches import BatchReader
from .harvest import MODES, BatchFeatures, Harvester, exact_gradients, harvest
from .params import projector_for_model, select_parameters
from .projection import Projector, make_projector, projector_from_config
from .readout import ReadoutBuilder, adam_preconditioner, exact_readout
from .runner import HarvestRunner

__all__ = [
    "harvest",
    "Harvester",
    "BatchFeatures",
    "HarvestRunner",
    "BatchReader",
    "exact_gradients",
    "select_parameters",
    "projector_for_model",
    "Projector",
    "make_projector",
    "projector_from_config",
    "MODES",
    "ReadoutBuilder",
    "adam_preconditioner",
    "exact_readout",
]
