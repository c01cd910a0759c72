"""The settings tables of the docs are generated from lightning_ksm.config and must stay in sync."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from lightning_ksm import config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "_settings_table.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("_settings_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_tables_match_config(tables):
    for name, (cls, doc, options) in tables.TABLES.items():
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        assert f"<!-- settings:{name} -->" in text and f"<!-- /settings:{name} -->" in text, (
            f"docs/{doc} lost the markers of the {name} settings table"
        )
        expected = tables.refreshed(text, name, tables.markdown_table(cls, options=options))
        assert text == expected, (
            f"the {name} settings table in docs/{doc} differs from lightning_ksm.config: "
            f"run `python docs/_settings_table.py` to refresh it"
        )


def test_tables_cover_every_setting(tables):
    assert {cls for cls, _, _ in tables.TABLES.values()} == {config.AnalysisConfig, config.HarvestConfig}
    for cls, _, options in tables.TABLES.values():
        table = tables.markdown_table(cls, options=options)
        rows = table.splitlines()[2:]
        assert [r.split(" | ")[0].strip("| `") for r in rows] == [f.name for f in dataclasses.fields(cls)]
        for row in config.describe(cls):
            assert row["help"].replace("|", "\\|") in table
    analysis = tables.markdown_table(config.AnalysisConfig, options=True)
    assert "| `kernel` | `--kernel` | `\"rbf\"` |" in analysis
    assert "`--n-subsets`" in analysis and "integer >= 10" in analysis


def test_refresh_rewrites_only_between_the_markers(tables, tmp_path):
    doc = tmp_path / "settings.md"
    before, after = "intro\n\n", "\n\noutro\n"
    stale_text = before + "<!-- settings:analysis -->\n| old |\n<!-- /settings:analysis -->" + after
    doc.write_text(stale_text + "<!-- settings:harvest -->\n<!-- /settings:harvest -->\n")
    assert tables.stale(tmp_path) == ["settings.md: analysis", "settings.md: harvest"]
    assert doc.read_text().startswith(stale_text)  # only checked
    tables.stale(tmp_path, write=True)
    text = doc.read_text()
    assert text.startswith(before) and after in text and "| old |" not in text
    assert tables.markdown_table(config.AnalysisConfig, options=True) in text
    assert tables.stale(tmp_path) == []
    with pytest.raises(KeyError, match="settings:analysis"):
        tables.refreshed("no markers", "analysis", "| t |")
