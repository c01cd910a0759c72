"""``python -m lightning_ksm.demo``."""

from .run import main

main()
