"""The analysis settings as command-line options, generated from :mod:`lightning_ksm.config`.

Each field of :class:`~lightning_ksm.config.AnalysisConfig` becomes one option ``--field-name``: its
type comes from the field's annotation, its choices, help and check from the field's metadata
(:func:`lightning_ksm.config.describe`). Nothing about a setting is declared here, so a new field of
``AnalysisConfig`` is a new option without touching the command line.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from functools import lru_cache
from typing import Any, Callable

from ..config import AnalysisConfig, describe

__all__ = ["SettingOption", "analysis_options", "option_for", "EXCLUSIVE"]

# Set one or the other: --subset-p and --subset-size are a mutually exclusive group.
EXCLUSIVE = ("subset_p", "subset_size")

# What only the command line adds to a setting's help.
_CLI_NOTES = {"subset_p": "--subset-p clears a subset_size from --config"}

_AUTO = ("auto", "none", "null")  # an optional setting back to None


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _AUTO)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(int | float | str, optional) of a field annotation such as ``Optional[int]``."""
    optional = False
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if annotation not in (int, float, str):
        raise TypeError(f"no command-line parser for a setting of type {annotation!r}")
    return annotation, optional


@dataclasses.dataclass(frozen=True)
class SettingOption:
    """One setting as an option: how a string (or a value from a JSON file) becomes its value."""

    name: str
    kind: type  # int, float or str
    optional: bool  # None is allowed, written 'auto' (or 'none')
    choices: tuple | None
    check: Callable[[str, Any], None]
    default: Any
    help: str
    allowed: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_choices(self) -> tuple:
        return tuple(self.choices or ()) + (("auto",) if self.optional else ())

    @property
    def metavar(self) -> str:
        if self.choices:
            return "{" + ",".join(self.shown_choices) + "}"
        word = {int: "INT", float: "FLOAT"}.get(self.kind, "TEXT")
        return f"{word}|auto" if self.optional else word

    @property
    def default_text(self) -> str:
        if self.default is None:
            return "off" if self.name == "subset_size" else "auto"
        return str(self.default)

    @property
    def help_text(self) -> str:
        """The setting's help from config, the command line's note, its allowed values and default."""
        text = self.help.replace("None:", "auto:") if self.optional else self.help
        if self.name in _CLI_NOTES:
            text += f"; {_CLI_NOTES[self.name]}"
        details = [] if self.choices else [self.allowed.replace(", or None", "")]
        details.append(f"default: {self.default_text}")
        return f"{text} ({'; '.join(d for d in details if d)})".replace("%", "%%")  # argparse formats %

    def _convert(self, value: Any) -> Any:
        """``value`` as the setting's type when it reads as one, else unchanged (the check names it)."""
        if isinstance(value, bool):
            return value
        if self.kind is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    return value
        elif self.kind is float:
            if isinstance(value, numbers.Real):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value.strip())
                except ValueError:
                    return value
        elif self.choices and isinstance(value, str):
            return value.strip().lower()
        return value

    def parse(self, value: Any) -> Any:
        """The setting's value from a command-line string or a JSON value; ValueError names the setting.

        The message is the config check's (e.g. ``"n_subsets must be an integer >= 10, got 5"``); for a
        setting with choices it lists the choices shown on the command line.
        """
        if self.optional and _is_auto(value):
            return None
        out = self._convert(value)
        try:
            self.check(self.name, out)
        except ValueError:
            if not self.choices:
                raise
            raise ValueError(
                f"{self.name} must be one of {', '.join(self.shown_choices)}, got {value!r}"
            ) from None
        return out


@lru_cache(maxsize=None)
def analysis_options() -> tuple[SettingOption, ...]:
    """One option per field of AnalysisConfig, in declaration order."""
    hints = typing.get_type_hints(AnalysisConfig)
    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(AnalysisConfig)}
    options = []
    for row in describe(AnalysisConfig):
        kind, optional = _base_type(hints[row["name"]])
        options.append(SettingOption(
            name=row["name"], kind=kind, optional=optional, choices=row["choices"], check=checks[row["name"]],
            default=row["default"], help=row["help"], allowed=row["allowed"],
        ))
    return tuple(options)


def option_for(name: str) -> SettingOption:
    for option in analysis_options():
        if option.name == name:
            return option
    raise KeyError(name)
