"""``TaskAttribution`` for the ``lightning.pytorch`` namespace (``import lightning``)."""

from lightning.pytorch.callbacks import Callback

from .callback import TaskAttributionMixin


class TaskAttribution(TaskAttributionMixin, Callback):
    __doc__ = TaskAttributionMixin.__doc__


__all__ = ["TaskAttribution"]
