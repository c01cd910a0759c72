"""Lightning callbacks: they decide when the engine runs and where its files go.

:mod:`.base` (shared lifecycle: output directory, W0 file, resume state, analysis at fit end),
:mod:`.task_attribution` (the supervised callback's core), :mod:`.snapshot` (W0: safe loading, found
by identity on resume), :mod:`.inputs` (the named loaders and the whole-data check),
:mod:`.loggers` (logging a report).
The namespace-specific classes are ``lightning_ksm.TaskAttribution`` (``lightning.pytorch``),
``lightning_ksm.pl.TaskAttribution`` (``pytorch_lightning``) and
``lightning_ksm.rl.RLTaskAttribution``.
"""

from .base import AttributionCallbackBase
from .task_attribution import TaskAttributionMixin

__all__ = ["AttributionCallbackBase", "TaskAttributionMixin"]
