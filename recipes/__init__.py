"""Runnable end-to-end examples of lightning-ksm (``python -m recipes.<name> --help``)."""
