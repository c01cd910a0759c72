"""Render the settings tables of the docs from :mod:`lightning_ksm.config`, the one source of them.

Each table sits in a doc between two markers, e.g. for :class:`~lightning_ksm.config.AnalysisConfig`::

    <!-- settings:analysis -->
    | setting | option | default | allowed | meaning |
    ...
    <!-- /settings:analysis -->

Run ``python docs/_settings_table.py`` after changing a setting to refresh the tables in place;
``--check`` only reports the stale ones (exit status 1). ``tests/test_config_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lightning_ksm.config import AnalysisConfig, HarvestConfig, describe

DOCS = Path(__file__).resolve().parent

# marker name -> (settings class, doc holding its table, whether a column gives the CLI option)
TABLES = {
    "analysis": (AnalysisConfig, "settings.md", True),
    "harvest": (HarvestConfig, "settings.md", False),
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _allowed(row: dict) -> str:
    if row["choices"]:  # one_of: "a | b | None | callable"
        return ", ".join(f"`{c}`" if c not in ("None", "callable") else c for c in row["allowed"].split(" | "))
    return row["allowed"]


def markdown_table(cls, *, options: bool = False) -> str:
    """The Markdown table of every setting of ``cls``, from :func:`lightning_ksm.config.describe`."""
    head = ["setting", *(["option"] if options else []), "default", "allowed", "meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in describe(cls):
        cells = [f"`{row['name']}`"]
        if options:
            cells.append(f"`--{row['name'].replace('_', '-')}`")
        cells += [_default(row["default"]), _allowed(row), row["help"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- settings:{name} -->\n)(.*?)(<!-- /settings:{name} -->)", re.S)


def refreshed(text: str, name: str, table: str) -> str:
    """``text`` with the table between the markers of ``name`` replaced; KeyError when they are absent."""
    pattern = _pattern(name)
    if not pattern.search(text):
        raise KeyError(f"no <!-- settings:{name} --> ... <!-- /settings:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(3), text, count=1)


def stale(docs: Path = DOCS, *, write: bool = False) -> list[str]:
    """The tables whose docs differ from config ("file: name"); with ``write``, refresh them."""
    out = []
    for name, (cls, doc, options) in TABLES.items():
        path = docs / doc
        text = path.read_text(encoding="utf-8")
        new = refreshed(text, name, markdown_table(cls, options=options))
        if new != text:
            out.append(f"{doc}: {name}")
            if write:
                path.write_text(new, encoding="utf-8")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit status 1)")
    args = parser.parse_args(argv)
    found = stale(write=not args.check)
    for entry in found:
        print(("stale: " if args.check else "refreshed: ") + entry)
    return 1 if found and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
