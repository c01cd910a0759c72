"""``TaskAttribution`` for the ``lightning.pytorch`` namespace (``import lightning``)."""

from lightning.pytorch.callbacks import Callback

from .callbacks.task_attribution import TaskAttributionMixin


class TaskAttribution(TaskAttributionMixin, Callback):
    __doc__ = TaskAttributionMixin.__doc__


__all__ = ["TaskAttribution"]
