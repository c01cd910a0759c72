"""The demo (``make demo`` / ``python -m lightning_ksm.demo``) and its planted problem.

:mod:`.planted` is a small multi-task problem with known task effects (used by the demo, the tests
and ``docs/quickstart.md``); :mod:`.run` trains on it with the callback and checks the report by
real retraining. Neither is part of the library's public names (``lightning_ksm.__all__``).
"""

from .run import _prepare_out, main, planted_demo, synthetic_demo

__all__ = ["main", "planted_demo", "synthetic_demo"]
