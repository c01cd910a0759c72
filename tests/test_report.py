"""Tests for AttributionReport: storage round trips, file contents, rankings, HTML safety."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from html.parser import HTMLParser
from importlib import metadata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ksm.report import AttributionReport, collect_versions
from lightning_ksm.report.html import diverging_color

EVIL = "<script>alert(1)</script>"
QUOTED = "say \"hi\" & 'bye', ok"
TASKS = ["alpha", "beta", EVIL, QUOTED, "gamma"]
TARGETS = ["t1", "t2", "all"]
K, T, M = len(TASKS), len(TARGETS), 24


def sym(rng: np.random.Generator, t: int, k: int) -> np.ndarray:
    a = rng.normal(size=(t, k, k))
    a = a + a.transpose(0, 2, 1)
    for m in a:
        np.fill_diagonal(m, 0.0)
    return a


def make_report(seed: int = 0, **overrides) -> AttributionReport:
    rng = np.random.default_rng(seed)
    kw = dict(
        task_names=TASKS,
        target_names=TARGETS,
        scores={"ensemble": rng.normal(size=(K, T)), "loo": rng.normal(size=(K, T))},
        interactions=sym(rng, T, K),
        best_subsets=[
            {"target": "all", "size": 2, "tasks": ["alpha", EVIL], "predicted_loss": 0.25,
             "full_set_loss": 0.4, "exact": True},
            {"target": "t1", "size": 1, "tasks": [QUOTED], "predicted_loss": 0.3,
             "full_set_loss": 0.35, "exact": False},
        ],
        groups=[
            {"tasks": ["alpha", "beta"], "predicted_loss": {"t1": 0.3, "all": 0.5}},
            {"tasks": [EVIL, QUOTED, "gamma"], "predicted_loss": 0.45},
        ],
        fit_quality={"heldout_lds": 0.83, "heldout_residual_error": 0.021, "n_train_subsets": 20,
                     "n_heldout_subsets": 4, "surrogate": {"kernel": "rbf", "gamma": 0.5, "alpha": 1e-3}},
        subsets=rng.random((M, K)) < 0.5,
        losses=rng.random((M, T)),
        config={"n_subsets": M, "p": np.float64(0.5), "projection_dim": np.int64(64), "dims": (1, 2),
                "name": EVIL},
        seeds={"subsets": 0, "projection": 1},
        timings={"harvest": 1.25, "gradex": 3.5, "surrogate": 0.125},
        created_at="2026-01-02T03:04:05+00:00",
    )
    kw.update(overrides)
    return AttributionReport(**kw)


class Cells(HTMLParser):
    """Collects the heatmap <rect> cells and the text of their <title> children."""

    def __init__(self, cls: str):
        super().__init__()
        self.cls, self.cells, self._cur, self._in_title = cls, [], None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "rect" and a.get("class") == self.cls:
            self._cur = dict(a, title="")
            self.cells.append(self._cur)
        elif tag == "title" and self._cur is not None:
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag == "rect":
            self._cur = None

    def handle_data(self, data):
        if self._in_title and self._cur is not None:
            self._cur["title"] += data


# -- save / load -------------------------------------------------------------------------------


def test_round_trip_restores_an_equal_report(tmp_path):
    rep = make_report(scores={"ensemble": np.array([[np.nan, 1.0, -np.inf]] + [[0.1 * i, 1e-300, 2.0 / 3] for i in range(4)]),
                              "loo": np.arange(K * T, dtype=np.float32).reshape(K, T) / 7})
    rep.save(tmp_path, figures=False)
    back = AttributionReport.load(tmp_path)
    assert back == rep
    # field by field, so a broken __eq__ cannot hide a difference
    assert back.task_names == TASKS and back.target_names == TARGETS
    assert back.methods == ("ensemble", "loo") and back.default_method == "ensemble"
    for m in rep.scores:
        assert back.scores[m].dtype == np.float64
        np.testing.assert_array_equal(back.scores[m], rep.scores[m])  # exact, NaN == NaN
    assert math.isnan(back.scores["ensemble"][0, 0]) and back.scores["ensemble"][0, 2] == -np.inf
    np.testing.assert_array_equal(back.interactions, rep.interactions)
    np.testing.assert_array_equal(back.subsets, rep.subsets)
    assert back.subsets.dtype == np.bool_
    np.testing.assert_array_equal(back.losses, rep.losses)
    assert back.groups == rep.groups and back.best_subsets == rep.best_subsets
    assert back.config == {"n_subsets": M, "p": 0.5, "projection_dim": 64, "dims": [1, 2], "name": EVIL}
    assert back.seeds == rep.seeds and back.timings == rep.timings
    assert back.versions == rep.versions and back.created_at == rep.created_at
    assert back.fit_quality == rep.fit_quality


def test_equality_sees_a_single_changed_value():
    a, b = make_report(), make_report()
    assert a == b
    b.scores["loo"][3, 1] += 1e-12
    assert a != b
    c = make_report()
    c.config["n_subsets"] = M + 1
    assert a != c


def test_report_json_is_strict_json_and_non_finite_values_survive(tmp_path):
    rep = make_report(fit_quality={"heldout_lds": float("nan"), "x": [float("inf"), -float("inf"), 1.5]},
                      interactions=None, subsets=None, losses=None)
    rep.save(tmp_path, figures=False)

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads((tmp_path / "report.json").read_text(encoding="utf-8"), parse_constant=reject)
    back = AttributionReport.load(tmp_path)
    assert math.isnan(back.fit_quality["heldout_lds"])
    assert back.fit_quality["x"] == [math.inf, -math.inf, 1.5]
    assert back.interactions is None and back.subsets is None and back.losses is None
    assert not (tmp_path / "interactions.csv").exists() and not (tmp_path / "subsets.npy").exists()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    names=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=5, unique=True),
    n_targets=st.integers(1, 3),
    data=st.data(),
)
def test_round_trip_property(tmp_path_factory, names, n_targets, data):
    values = st.floats(allow_nan=True, allow_infinity=True, width=64)
    scores = np.array(data.draw(st.lists(st.lists(values, min_size=n_targets, max_size=n_targets),
                                         min_size=len(names), max_size=len(names))), dtype=np.float64)
    targets = [f"target {i} \u00e9" for i in range(n_targets)]
    rep = AttributionReport(names, targets, {"loo": scores}, config={"names": names}, created_at="2020-01-01T00:00:00+00:00")
    d = tmp_path_factory.mktemp("prop")
    rep.save(d, figures=False)
    assert AttributionReport.load(d) == rep


def test_scores_csv_holds_the_arrays(tmp_path):
    rep = make_report()
    rep.save(tmp_path, figures=False)
    for fname, method in (("scores.csv", "ensemble"), ("scores_loo.csv", "loo")):
        with open(tmp_path / fname, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["task", *TARGETS]
        assert [r[0] for r in rows[1:]] == TASKS  # names with commas and quotes survive quoting
        got = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
        np.testing.assert_array_equal(got, rep.scores[method])  # repr floats: exact
    assert not (tmp_path / "scores_ensemble.csv").exists()  # the default lives in scores.csv


def test_interactions_csv_is_long_format_upper_triangle(tmp_path):
    rep = make_report()
    rep.save(tmp_path, figures=False)
    with open(tmp_path / "interactions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == T * K * (K - 1) // 2
    seen = set()
    for r in rows:
        t, i, j = TARGETS.index(r["target"]), TASKS.index(r["task_i"]), TASKS.index(r["task_j"])
        assert i < j
        assert float(r["interaction"]) == rep.interactions[t, i, j] == rep.interactions[t, j, i]
        seen.add((t, i, j))
    assert len(seen) == len(rows)


def test_csv_quoting_of_awkward_names(tmp_path):
    names = ["a,b", 'q"uote', "line\nbreak", "cr\rx", " lead space", "=SUM(A1)"]
    k = len(names)
    rng = np.random.default_rng(5)
    rep = AttributionReport(names, ["x,y", "all"], {"loo": rng.normal(size=(k, 2))}, interactions=sym(rng, 2, k))
    rep.save(tmp_path, figures=False)
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    # A cell a spreadsheet would run as a formula is written as text (issue 14, item 8).
    cells = [n if n[0] not in "=+-@" else "'" + n for n in names]
    assert rows[0] == ["task", "x,y", "all"] and [r[0] for r in rows[1:]] == cells
    with open(tmp_path / "interactions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    expected = [[t, cells[i], cells[j], repr(float(rep.interactions[ti, i, j]))]
                for ti, t in enumerate(["x,y", "all"]) for i in range(k) for j in range(i + 1, k)]
    assert rows == [["target", "task_i", "task_j", "interaction"]] + expected


def test_json_side_files_match_the_report(tmp_path):
    rep = make_report()
    rep.save(tmp_path, figures=False)
    assert json.loads((tmp_path / "groups.json").read_text(encoding="utf-8")) == rep.groups
    assert json.loads((tmp_path / "best_subsets.json").read_text(encoding="utf-8")) == rep.best_subsets
    np.testing.assert_array_equal(np.load(tmp_path / "subsets.npy"), rep.subsets)
    np.testing.assert_array_equal(np.load(tmp_path / "losses.npy"), rep.losses)
    np.testing.assert_array_equal(np.load(tmp_path / "interactions.npy"), rep.interactions)


def test_save_leaves_no_temp_files_and_creates_the_directory(tmp_path):
    out = tmp_path / "a" / "b"
    written = make_report().save(out, figures=False)
    names = sorted(os.listdir(out))
    assert names == sorted(written)
    assert names == sorted(["report.json", "scores.csv", "scores_loo.csv", "interactions.csv",
                            "interactions.npy", "groups.json", "best_subsets.json", "subsets.npy", "losses.npy", "report.html"])
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]


def test_failed_save_keeps_the_old_report_and_no_temp_files(tmp_path, monkeypatch):
    old = make_report(seed=1)
    old.save(tmp_path, figures=False)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        make_report(seed=2).save(tmp_path, figures=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") or n.endswith(".tmp")]
    # report.json is written last, so the old one is still complete and self-consistent
    assert AttributionReport.load(tmp_path) == old


def test_resave_removes_files_the_new_report_does_not_write(tmp_path):
    make_report().save(tmp_path, figures=False)
    (tmp_path / "notes.txt").write_text("mine")
    rep = make_report(scores={"ensemble": np.zeros((K, T))}, interactions=None, subsets=None, losses=None)
    rep.save(tmp_path, figures=False)
    assert not (tmp_path / "scores_loo.csv").exists()
    assert not (tmp_path / "interactions.csv").exists()
    assert not (tmp_path / "subsets.npy").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # never touches files it did not write
    assert AttributionReport.load(tmp_path) == rep


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AttributionReport.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="report.json"):
        AttributionReport.load(tmp_path)

    make_report().save(tmp_path, figures=False)
    assert AttributionReport.load(tmp_path / "report.json") == AttributionReport.load(tmp_path)

    data = bytearray((tmp_path / "subsets.npy").read_bytes())
    data[-1] ^= 1
    (tmp_path / "subsets.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="subsets.npy.*checksum"):
        AttributionReport.load(tmp_path)

    (tmp_path / "subsets.npy").unlink()
    with pytest.raises(FileNotFoundError, match="subsets.npy"):
        AttributionReport.load(tmp_path)

    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    (tmp_path / "report.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match="report.json.*not valid JSON"):
        AttributionReport.load(tmp_path)

    (tmp_path / "report.json").write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="report.json.*not a lightning-ksm report"):
        AttributionReport.load(tmp_path)

    make_report().save(tmp_path, figures=False)
    payload = json.loads(text)
    payload["scores"]["loo"] = payload["scores"]["loo"][:-1]  # one row short
    (tmp_path / "report.json").write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(ValueError, match=r"report.json.*scores\['loo'\]"):
        AttributionReport.load(tmp_path)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, exc, pattern",
    [
        (dict(task_names=TASKS[:-1]), ValueError, r"scores\['ensemble'\] has shape \(5, 3\), expected \(K, T\) = \(4, 3\)"),
        (dict(scores={"ensemble": np.zeros((K, T)), "loo": np.zeros((K, T + 1))}), ValueError, r"scores\['loo'\]"),
        (dict(task_names=["a", "b", "a", "c", "d"]), ValueError, "task_names has the duplicate name 'a'"),
        (dict(target_names=["x", "x", "y"]), ValueError, "target_names has the duplicate name 'x'"),
        (dict(task_names=["a", "", "b", "c", "d"]), ValueError, r"task_names\[1\] is an empty string"),
        (dict(task_names=["a", 2, "b", "c", "d"]), TypeError, r"task_names\[1\] must be a string"),
        (dict(interactions=np.zeros((T, K, K - 1))), ValueError, "interactions has shape"),
        (dict(subsets=np.zeros((M, K + 1), bool)), ValueError, "subsets has shape"),
        (dict(subsets=np.full((M, K), 2)), ValueError, "subsets must hold only 0/1"),
        (dict(losses=np.zeros((M, T - 1))), ValueError, "losses has shape"),
        (dict(losses=np.zeros((M + 1, T))), ValueError, "subsets has 24 rows but losses has 25"),
        (dict(default_method="shapley"), ValueError, "default_method='shapley'"),
        (dict(scores={"a/b": np.zeros((K, T))}), ValueError, "method name 'a/b'"),
        (dict(scores={}), ValueError, "scores must be a non-empty dict"),
        (dict(best_subsets=[{"target": "all", "tasks": ["zeta"]}]), ValueError, r"best_subsets\[0\]\['tasks'\] names the unknown task 'zeta'"),
        (dict(best_subsets=[{"target": "nope", "tasks": ["alpha"]}]), ValueError, r"best_subsets\[0\]\['target'\]='nope'"),
        (dict(best_subsets=[{"target": "all", "size": 3, "tasks": ["alpha"]}]), ValueError, r"\['size'\]=3"),
        (dict(groups=[{"predicted_loss": 1.0}]), ValueError, r"groups\[0\] needs a 'tasks' list"),
        (dict(groups=[{"tasks": ["alpha"], "predicted_loss": {"t9": 1.0}}]), ValueError, "unknown target 't9'"),
        (dict(config={"f": object()}), TypeError, r"config\['f'\] holds a value of type object"),
        (dict(config={"a": {1: 2}}), TypeError, r"config\['a'\] has the key 1"),
        (dict(timings={"gradex": "fast"}), TypeError, r"timings\['gradex'\] must be a number"),
    ],
)
def test_constructor_rejects_bad_input(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make_report(**overrides)


def test_constructor_rejects_asymmetric_interactions_but_tolerates_rounding():
    inter = sym(np.random.default_rng(3), T, K)
    inter[1, 0, 3] += 1e-15  # rounding-level difference: accepted
    make_report(interactions=inter)
    inter[2, 1, 4] += 0.5
    with pytest.raises(ValueError, match=r"interactions\[2, 1, 4\].*target 'all', tasks 'beta' and 'gamma'"):
        make_report(interactions=inter)


def test_constructor_normalises_inputs():
    rep = make_report(seeds=7, subsets=np.ones((M, K), dtype=np.int64), task_names=np.array(TASKS))
    assert rep.seeds == {"seed": 7}
    assert rep.subsets.dtype == np.bool_ and rep.subsets.all()
    assert all(type(n) is str for n in rep.task_names)
    assert make_report(scores={"loo": np.zeros((K, T)), "ensemble": np.zeros((K, T))}).default_method == "ensemble"
    assert make_report(scores={"b": np.zeros((K, T)), "a": np.zeros((K, T))}).default_method == "b"
    src = np.ones((K, T))
    rep = make_report(scores={"ensemble": src})
    src[0, 0] = 5.0
    assert rep.scores["ensemble"][0, 0] == 1.0  # the report holds its own copy


def test_collect_versions():
    v = collect_versions()
    assert v["numpy"] == metadata.version("numpy")
    assert v["sklearn"] == metadata.version("scikit-learn")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", v["python"])
    assert make_report().versions == v


# -- rankings and text -------------------------------------------------------------------------


def test_ranked_orders_high_to_low_with_stable_ties_and_nan_last():
    s = np.array([[0.5, 1.0, 0.0], [-1.0, 2.0, 0.0], [np.nan, 3.0, 0.0], [0.5, -4.0, 0.0], [2.0, 0.0, 0.0]])
    rep = make_report(scores={"ensemble": s, "loo": -s})
    assert [t for t, _ in rep.ranked("t1")] == ["gamma", "alpha", QUOTED, "beta", EVIL]
    assert [v for _, v in rep.ranked("t2")] == [3.0, 2.0, 1.0, 0.0, -4.0]
    assert [t for t, _ in rep.ranked("all")] == TASKS  # all tied: task order
    assert rep.ranked() == rep.ranked("all") == rep.ranked(2) == rep.ranked(-1)
    assert [t for t, _ in rep.ranked("t2", method="loo")] == [QUOTED, "gamma", "alpha", "beta", EVIL]
    assert rep.top_helpers(2, "t2") == [(EVIL, 3.0), ("beta", 2.0)]
    assert rep.top_hurters(5, "t2") == [(QUOTED, -4.0)]
    assert rep.top_hurters(5, "all") == [] and rep.top_helpers(5, "all") == []
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        rep.ranked("nope")
    with pytest.raises(ValueError, match="unknown method 'shap'"):
        rep.ranked(method="shap")


def test_default_target_is_all_else_first():
    assert make_report().default_target == "all"
    rep = make_report(target_names=["x", "y", "z"], best_subsets=[], groups=[])
    assert rep.default_target == "x"


def test_top_pairs_and_interaction_lookup():
    inter = np.zeros((T, K, K))
    for t, i, j, v in [(2, 0, 1, -3.0), (2, 2, 4, -1.0), (2, 1, 3, 2.0), (2, 0, 4, 0.5), (0, 0, 1, 9.0)]:
        inter[t, i, j] = inter[t, j, i] = v
    rep = make_report(interactions=inter)
    assert rep.top_pairs(5, kind="synergy") == [("alpha", "beta", -3.0), (EVIL, "gamma", -1.0)]
    assert rep.top_pairs(1, kind="antagonism") == [("beta", QUOTED, 2.0)]
    assert rep.top_pairs(5, "t1", "antagonism") == [("alpha", "beta", 9.0)]
    assert rep.interaction("beta", "alpha") == rep.interaction(0, 1, "all") == -3.0
    with pytest.raises(ValueError, match="kind must be"):
        rep.top_pairs(kind="both")


def test_to_text_lists_tasks_in_ranked_order():
    rep = make_report()
    text = rep.to_text(max_rows=None)
    for target in TARGETS:
        section = text.split(f"== target '{target}' ==")[1].split("==")[0]
        positions = [section.index(f"  {task}") for task, _ in rep.ranked(target)]
        assert positions == sorted(positions), target
        assert f"{rep.ranked(target)[0][1]:+.3g}" in section
    # the targets the user cares about (validation groups that are not source tasks) lead
    assert rep.focus_targets == ["t1", "t2"]
    assert text.index("== target 't1' ==") < text.index("== target 'all' ==")
    assert "held-out LDS 0.830" in text and "alpha, <script>alert(1)</script>" in text


def test_to_text_truncates_the_middle_and_sanitises_control_characters():
    rep = make_report(task_names=["a", "b", "c\x1b[2J", "d", "e"], best_subsets=[], groups=[],
                      scores={"ensemble": np.array([[5.0, 0, 0], [4, 0, 0], [3, 0, 0], [2, 0, 0], [1, 0, 0]])})
    text = rep.to_text(max_rows=3, targets=["t1"])
    rows = [ln.split()[1] for ln in text.splitlines() if re.match(r"\s+\d+\s", ln)]
    assert rows == ["a", "b", "e"]
    assert "2 more tasks not shown" in text
    full = rep.to_text(max_rows=None, targets=["t1"])
    assert "\x1b" not in full and "c\\x1b[2J" in full
    with pytest.raises(ValueError, match="max_rows"):
        rep.to_text(max_rows=0)


def test_summary_metrics_are_flat_finite_floats():
    s = np.arange(K * T, dtype=float).reshape(K, T)
    s[1, 1] = np.nan
    rep = make_report(scores={"ensemble": s}, task_names=["a b", "a/b", "c", "d", "e"], best_subsets=[], groups=[])
    m = rep.summary_metrics()
    assert all(type(v) is float for v in m.values())
    assert m["ksm/score/t1/a_b_0"] == 0.0 and m["ksm/score/all/a_b_1"] == 5.0  # collision made unique
    assert m["ksm/score/t2/e"] == s[4, 1]
    assert "ksm/score/t2/a_b_1" not in m  # NaN left out
    assert sum(k.startswith("ksm/score/") for k in m) == K * T - 1
    assert m["ksm/fit/heldout_lds"] == 0.83 and m["ksm/fit/n_train_subsets"] == 20.0
    assert "ksm/fit/surrogate" not in m
    assert m["ksm/fit/warnings"] == 0.0
    warned = make_report(fit_quality={"heldout_lds": 0.8, "warnings": ["the linearized run goes the other way"]})
    assert warned.summary_metrics()["ksm/fit/warnings"] == 1.0
    assert warned.to_text().splitlines()[0] == "WARNING: the linearized run goes the other way"
    assert warned.warnings() == ["the linearized run goes the other way"]
    assert m["ksm/time/gradex"] == 3.5
    assert all(re.fullmatch(r"ksm/[A-Za-z0-9_./-]+", k) for k in m)
    assert make_report().summary_metrics("x")["x/best_subset/all/size_2/predicted_loss"] == 0.25


# -- HTML --------------------------------------------------------------------------------------


def test_html_escapes_every_name(tmp_path):
    rep = make_report()
    rep.save(tmp_path, figures=False)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert EVIL not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "say &quot;hi&quot; &amp; &#x27;bye&#x27;, ok" in page
    assert QUOTED not in page
    # self-contained: nothing is fetched
    assert not re.search(r"https?://|\bsrc=|<link|@import|url\((?!#)", page)
    assert "Content-Security-Policy" in page


def test_html_score_heatmap_has_one_cell_per_task_and_target():
    rep = make_report()
    parser = Cells("ksm-cell")
    parser.feed(rep.to_html())
    assert len(parser.cells) == K * T
    seen = set()
    for c in parser.cells:
        i, j = int(c["data-row"]), int(c["data-col"])
        v = rep.scores["ensemble"][i, j]
        assert float(c["data-value"]) == v
        assert c["title"] == f"{TASKS[i]} \u2192 {TARGETS[j]}: ensemble score {v:.3g}"
        # one colour scale per target column
        assert c["fill"] == diverging_color(v, np.abs(rep.scores["ensemble"][:, j]).max(), 1.0)
        seen.add((i, j))
    assert len(seen) == K * T


def test_html_interaction_heatmap_cells_and_legend():
    rep = make_report()
    page = rep.to_html()
    parser = Cells("ksm-icell")
    parser.feed(page)
    assert len(parser.cells) == K * (K - 1)  # diagonal left blank
    for c in parser.cells:
        i, j = int(c["data-row"]), int(c["data-col"])
        v = rep.interactions[0, i, j]  # the first target of interest, t1
        assert i != j and float(c["data-value"]) == v
        assert re.search(r"\((synergy|redundancy|compounding harm|redundant harm|masking)\)$", c["title"])
    assert "synergy" in page and "compounding harm" in page and "masking" in page
    assert "the other 2 target(s) are in <code>interactions.csv</code>" in page
    assert "ksm-icell" not in make_report(interactions=None).to_html()


def test_diverging_color_scale():
    assert diverging_color(0.0, 1.0) == "#f7f7f7"
    assert diverging_color(1.0, 1.0) == "#2166ac" == diverging_color(-1.0, 1.0, good_sign=-1)
    assert diverging_color(-5.0, 1.0) == "#b2182b"  # clipped
    assert diverging_color(float("nan"), 1.0) == "#bdbdbd"
    mid = diverging_color(0.5, 1.0)
    assert mid not in ("#f7f7f7", "#2166ac") and int(mid[5:], 16) > 0xac  # between white and blue


def test_html_lists_ranked_tables_subsets_groups_fit_and_versions():
    rep = make_report()
    page = rep.to_html()
    default = page.split("<summary>target all</summary>")[1].split("</details>")[0]
    assert page.index("<summary>target t1</summary>") < page.index("<summary>target all</summary>")
    order = [default.index(f"<td>{t.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace(chr(34), '&quot;').replace(chr(39), '&#x27;')}</td>")
             for t, _ in rep.ranked("all")]
    assert order == sorted(order)
    assert page.count("<details") == T
    assert "exhaustive" in page and "heuristic" in page
    assert "Linear datamodeling score" in page and "ranks held-out subsets well" in page
    assert f"<td>numpy</td><td>{metadata.version('numpy')}</td>" in page


def test_figures_are_optional(tmp_path):
    make_report().save(tmp_path / "nofig", figures=False)
    assert not list((tmp_path / "nofig").glob("*.png"))
    with pytest.raises(ValueError, match="figures must be"):
        make_report().save(tmp_path / "bad", figures="yes")
    pytest.importorskip("matplotlib")
    written = make_report().save(tmp_path / "fig", figures=True)
    for name in ("scores.png", "interactions.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scores.png" in json.loads((tmp_path / "fig" / "report.json").read_text())["files"]


def test_interaction_heatmap_keeps_the_strongest_tasks_when_there_are_many():
    k = 70
    names = [f"task{i}" for i in range(k)]
    inter = np.full((1, k, k), 1e-3)
    inter[0, 3, 65] = inter[0, 65, 3] = -5.0  # tasks 3 and 65 must be shown
    inter[0, np.arange(k), np.arange(k)] = 0.0
    weak = np.random.default_rng(0).permutation(k)
    for i in weak[:20]:  # 20 tasks with no interaction at all beyond rounding
        inter[0, i, :] = inter[0, :, i] = 0.0
    inter[0, 3, 65] = inter[0, 65, 3] = -5.0
    rep = AttributionReport(names, ["all"], {"loo": np.zeros((k, 1))}, interactions=inter)
    parser = Cells("ksm-icell")
    parser.feed(rep.to_html())
    shown = sorted({int(c["data-row"]) for c in parser.cells})
    assert len(shown) == 60 and len(parser.cells) == 60 * 59
    assert 3 in shown and 65 in shown
    for c in parser.cells:
        assert float(c["data-value"]) == inter[0, int(c["data-row"]), int(c["data-col"])]
