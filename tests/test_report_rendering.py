"""The HTML report's key elements (issue 14, item 11): it leads with the targets the user cares about,
shows harmful tasks first-class, scales colours per target column, has no raw JSON, 3 significant
digits, and a fit-quality table whose rows are whole. Optionally rendered by a real headless
Chromium when one is installed (not a pixel test)."""

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from lightning_ksm import analyze, sample_subsets
from lightning_ksm.report.svg import diverging_color

TASKS = ["helper", "noisy", "pair-a", "pair-b", "neutral"]


class Page(HTMLParser):
    """Headings in order, table cells (class, text) per table, and heatmap cells."""

    def __init__(self):
        super().__init__()
        self.headings, self.tables, self.cells = [], [], []
        self._h = self._cell = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h2", "h3"):
            self._h = [tag, ""]
        elif tag == "table":
            self.tables.append({"class": a.get("class"), "rows": [], "before": list(self.headings)})
        elif tag == "tr" and self.tables:
            self._row = []
            self.tables[-1]["rows"].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [a.get("class"), ""]
            self._row.append(self._cell)
        elif tag == "rect" and a.get("class") == "ksm-cell":
            self.cells.append(a)

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._h:
            self.headings.append(tuple(self._h))
            self._h = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._h is not None:
            self._h[1] += data
        if self._cell is not None:
            self._cell[1] += data


@pytest.fixture(scope="module")
def report():
    K = len(TASKS)
    S = sample_subsets(K, 60, p=0.7, seed=0)
    X = S.astype(float)
    rng = np.random.default_rng(0)
    target = 1.0 - 0.3 * X[:, 0] + 0.2 * X[:, 1] - 0.4 * X[:, 2] * X[:, 3] + 0.01 * rng.normal(size=len(S))
    own = [0.9 - 0.05 * X[:, k] + 0.02 * X[:, (k + 1) % K] + 0.01 * rng.normal(size=len(S)) for k in range(K)]
    F = np.stack(own + [target, np.mean(own, axis=0)], axis=1)
    return analyze(subsets=S, losses=F, task_names=TASKS, target_names=TASKS + ["target", "all"],
                   config={"n_bootstrap": 30, "ensemble_samples": 500})


def _sig_digits(number: str) -> int:
    mantissa = number.lstrip("+-\u2212").split("e")[0]
    return len(mantissa.replace(".", "").lstrip("0")) if "." in mantissa else 0


def test_the_page_leads_with_the_target_of_interest_and_its_harmful_tasks(report):
    page = Page()
    page.feed(report.to_html())
    h2 = [text for tag, text in page.headings if tag == "h2"]
    assert report.focus_targets == ["target"]
    assert h2[:2] == ["How to read this page", "Target target"]
    hurt = next(t for t in page.tables if t["before"] and t["before"][-1][1].startswith("Tasks that hurt"))
    assert [r[0][1] for r in hurt["rows"][1:]][0] == "noisy"  # the planted harmful task, first-class
    helps = next(t for t in page.tables if t["before"][-1][1] == "Tasks that help")
    assert helps["rows"][0][2][1] == "interval" and helps["rows"][1][0][1] in ("helper", "pair-a", "pair-b")


def test_colours_are_scaled_per_target_column(report):
    page = Page()
    page.feed(report.to_html())
    order = [report.target_index(n) for n in report.focus_targets]
    order += [t for t in range(report.n_targets) if t not in order]
    sc = report.scores[report.default_method]
    assert len(page.cells) == sc.size
    for c in page.cells:
        i, j = int(c["data-row"]), int(c["data-col"])
        assert c["fill"] == diverging_color(sc[i, j], np.abs(sc[:, j]).max(), 1.0)
    assert "max of column" in report.to_html()


def test_no_raw_json_three_significant_digits_and_whole_fit_rows(report):
    html = report.to_html()
    assert "<pre>" not in html and '{"' not in html and "&quot;:" not in html
    page = Page()
    page.feed(html)
    for table in page.tables:
        for row in table["rows"]:
            for cls, text in row:
                if cls == "num":
                    for number in re.findall(r"[-+\u2212]?\d*\.\d+(?:e[-+]?\d+)?", text):
                        assert _sig_digits(number) <= 3, (number, text)
    fit = next(t for t in page.tables if t["before"][-1][1] == "Surrogate fit quality")
    assert [c[1] for c in fit["rows"][0]] == ["measure", "value", "meaning"]
    assert all(len(r) == 3 for r in fit["rows"])
    assert {r[0][1] for r in fit["rows"][1:]} >= {"heldout_lds", "heldout_residual_error", "support"}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium installed")
def test_a_real_browser_renders_the_key_elements(report, tmp_path):
    report.save(tmp_path, figures=False)
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    assert "Target target" in dom and "Tasks that hurt" in dom and "ksm-cell" in dom
    assert dom.index("Target target") < dom.index("Recommended co-training groups") < dom.index("Surrogate fit quality")
