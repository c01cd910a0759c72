"""``TaskAttribution`` for the ``pytorch_lightning`` namespace.

``lightning.pytorch`` and ``pytorch_lightning`` are separate class hierarchies: a callback of one is
rejected by the other's Trainer. Use ``lightning_ksm.TaskAttribution`` with ``lightning.pytorch``
and ``lightning_ksm.pl.TaskAttribution`` with ``pytorch_lightning``; both behave identically.
"""

from pytorch_lightning.callbacks import Callback

from .callbacks.task_attribution import TaskAttributionMixin


class TaskAttribution(TaskAttributionMixin, Callback):
    __doc__ = TaskAttributionMixin.__doc__


__all__ = ["TaskAttribution"]
