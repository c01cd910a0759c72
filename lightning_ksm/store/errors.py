"""The store's named errors. Each is a ``ValueError`` (what callers caught before they existed)."""

from __future__ import annotations

__all__ = ["StoreError", "CorruptStoreError", "IncompleteHarvestError"]


class StoreError(ValueError):
    """A feature store cannot be used as asked."""


class CorruptStoreError(StoreError):
    """The store's files contradict its manifest or shard records: a missing, short, edited or
    unreadable shard, a malformed manifest or record (the error names the file), a shard key that
    is not a plain name, task ids out of range."""


class IncompleteHarvestError(StoreError):
    """The harvest is incomplete or inconsistent (a killed run, a DDP rank that died): analysing it
    would silently use only part of the data. Resume the harvest, or ask for a partial analysis
    explicitly (``allow_partial=True``, ``lightning-ksm analyze --allow-partial``)."""
