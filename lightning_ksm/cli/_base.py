"""What every command of the command line shares: its name and its error type."""

from __future__ import annotations

__all__ = ["PROG", "CLIError"]

PROG = "lightning-ksm"


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2 (no traceback)."""

    def __init__(self, message: str, *, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
