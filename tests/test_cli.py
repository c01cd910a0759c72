"""The ``lightning-ksm`` command line: analyze / show on a small planted harvest, and its errors.

The harvest is synthetic with a known answer: a linear regression problem in feature space where
tasks ``agree_a`` and ``agree_b`` share the same true weights, ``oppose`` has the negated labels and
``noise`` has pure-noise labels. Training on an agreeing task lowers the loss of the other agreeing
task and raises the loss of ``oppose`` (and vice versa), so the rankings, best subsets and
co-training groups are known in advance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_ksm import AnalysisConfig, AttributionReport, analyze_store
from lightning_ksm import analysis as analysis_module
from lightning_ksm import cli, config
from lightning_ksm.cli import main
from lightning_ksm.store import FeatureStore

TASKS = ["agree_a", "agree_b", "oppose", "noise"]
FAST = ["--ensemble-samples", "300"]


def _labels(name: str, X: np.ndarray, w: np.ndarray, rng) -> np.ndarray:
    if name in ("agree_a", "agree_b"):
        return X @ w
    if name == "oppose":
        return -(X @ w)
    return rng.normal(size=len(X))


def _write_harvest(directory: Path, *, splits=("source", "target")) -> Path:
    """A FeatureStore with regression features f0 = 0, J = X (k = 6) for the four planted tasks."""
    rng = np.random.default_rng(0)
    k = 6
    w = rng.normal(size=k)
    store = FeatureStore(directory)
    store.initialize(projector_config={"kind": "synthetic", "k": k}, mode="regression",
                     params=[("w", [k])], task_names=TASKS)
    for split, n in (("source", 40), ("target", 20)):
        if split not in splits:
            continue
        for t, name in enumerate(TASKS):
            X = rng.normal(size=(n, k)).astype(np.float32)
            store.write_shard(split, t, outputs=np.zeros(n), jacobians=X, labels=_labels(name, X, w, rng),
                              task_ids=np.zeros(n, dtype=np.int64), task_values=[name])
    return directory


@pytest.fixture(scope="module")
def ksm_dir(tmp_path_factory) -> Path:
    """A TaskAttribution-style output directory: <ksm>/harvest (the store), nothing else yet."""
    root = tmp_path_factory.mktemp("ksm")
    _write_harvest(root / "harvest")
    return root


@pytest.fixture
def ksm(ksm_dir, tmp_path) -> Path:
    """A private copy of the output directory (tests add report directories to it)."""
    dst = tmp_path / "ksm"
    shutil.copytree(ksm_dir, dst)
    return dst


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if the expensive analysis starts (errors must come before it)."""

    def boom(*args, **kwargs):
        raise AssertionError("analyze_store was called although the input is invalid")

    monkeypatch.setattr(analysis_module, "analyze_store", boom)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _ranks_in_text(text: str, target: str) -> list:
    """Task names in the order the ranked table of ``target`` lists them."""
    section = text.split(f"== target '{target}' ==\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\s+\d+\s+(\S+)\s", section, flags=re.M)


# -- analyze -------------------------------------------------------------------------------------


def test_analyze_applies_every_given_setting(ksm, capsys):
    out = ksm / "custom"
    code, stdout, _ = _run(
        capsys, "analyze", ksm, "--out", out, "--n-subsets", 30, "--subset-size", 2, "--lam", "0.01",
        "--kernel", "poly", "--best-subset-size", 1, "--seed", 5, "--n-groups", 2, *FAST,
    )
    assert code == 0
    assert str(out.resolve()) in stdout and "lightning-ksm show" in stdout
    report = AttributionReport.load(out)
    cfg = report.config["analysis"]
    assert (cfg["n_subsets"], cfg["subset_size"], cfg["lam"], cfg["kernel"]) == (30, 2, 0.01, "poly")
    assert (cfg["best_subset_size"], cfg["seed"], cfg["n_groups"], cfg["ensemble_samples"]) == (1, 5, 2, 300)
    # The settings shaped the run, not only the record of it.
    assert report.subsets.shape == (30, 4) and (report.subsets.sum(axis=1) == 2).all()
    assert report.fit_quality["surrogate"]["kernel"] == "poly"
    assert all(len(e["tasks"]) == 1 for e in report.best_subsets)
    assert len(report.groups) == 2
    # Exactly the engine's result for the same settings.
    ref = analyze_store(ksm / "harvest", AnalysisConfig(
        n_subsets=30, subset_size=2, lam=0.01, kernel="poly", best_subset_size=1, seed=5, n_groups=2,
        ensemble_samples=300))
    np.testing.assert_array_equal(report.subsets, ref.subsets)
    np.testing.assert_array_equal(report.losses, ref.losses)
    for method in ref.scores:
        np.testing.assert_array_equal(report.scores[method], ref.scores[method])
    # The planted answer: agreeing tasks help each other, 'oppose' hurts them, and the two camps
    # are the co-training groups.
    ranked = [t for t, _ in report.ranked("agree_a")]
    assert set(ranked[:2]) == {"agree_a", "agree_b"} and ranked[-1] == "oppose"
    assert report.scores["ensemble"][TASKS.index("oppose"), report.target_index("agree_a")] < 0
    assert sorted(map(sorted, (g["tasks"] for g in report.groups))) == [["agree_a", "agree_b"], ["noise", "oppose"]]
    best = {e["target"]: e["tasks"] for e in report.best_subsets}
    assert best["oppose"] == ["oppose"] and best["agree_a"][0] in ("agree_a", "agree_b")


def test_same_seed_same_report_and_default_out_never_overwrites(ksm, capsys):
    runs = []
    for directory in (ksm, ksm / "harvest", ksm):  # the callback's output dir or the harvest itself
        code, stdout, _ = _run(capsys, "analyze", directory, "--n-subsets", 20, "--seed", 3, *FAST)
        assert code == 0
        runs.append(Path(re.search(r"report written to (\S+)", stdout).group(1)))
    assert len(set(runs)) == 3  # three new directories, none reused
    for path in runs:
        assert path.parent == ksm.resolve() and path.name.startswith("report-")
    first, second = (AttributionReport.load(p) for p in runs[:2])
    np.testing.assert_array_equal(first.subsets, second.subsets)
    for method in first.scores:
        np.testing.assert_array_equal(first.scores[method], second.scores[method])
    np.testing.assert_array_equal(first.interactions, second.interactions)
    code, stdout, _ = _run(capsys, "analyze", ksm, "--n-subsets", 20, "--seed", 4, *FAST)
    other = AttributionReport.load(re.search(r"report written to (\S+)", stdout).group(1))
    assert not np.array_equal(other.subsets, first.subsets)


def test_config_file_then_options(ksm, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"n_subsets": 20, "kernel": "linear", "subset_size": 3, "ensemble_samples": 300}))
    out = tmp_path / "r1"
    code, _, _ = _run(capsys, "analyze", ksm, "--config", settings, "--subset-p", "0.5", "--out", out)
    assert code == 0
    cfg = AttributionReport.load(out).config["analysis"]
    # from the file: n_subsets, kernel; the option --subset-p replaces the file's subset_size
    assert (cfg["n_subsets"], cfg["kernel"], cfg["subset_size"], cfg["subset_p"]) == (20, "linear", None, 0.5)
    assert len(set(AttributionReport.load(out).subsets.sum(axis=1).tolist())) > 1  # Bernoulli sizes vary
    # A saved report.json reuses that report's settings; one option changes one of them.
    out2 = tmp_path / "r2"
    code, _, err = _run(capsys, "analyze", ksm, "--config", out / "report.json", "--lam", "0.1", "--out", out2)
    assert code == 0, err
    cfg2 = AttributionReport.load(out2).config["analysis"]
    assert cfg2 == {**cfg, "lam": 0.1}


def test_existing_out_needs_force(ksm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        m.setattr(analysis_module, "analyze_store", lambda *a, **k: pytest.fail("analysis ran"))
        code, _, err = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 20)
        assert code == 2 and "--force" in err and "--out" in err
        # --force replaces a saved report, never files that are not part of one.
        code, _, err = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 20, "--force")
        assert code == 2 and "'notes.txt'" in err and "choose another directory" in err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    out = tmp_path / "report"
    code, _, _ = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 20, *FAST)
    assert code == 0 and AttributionReport.load(out).config["analysis"]["n_subsets"] == 20
    code, _, _ = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 25, "--force", *FAST)
    assert code == 0 and AttributionReport.load(out).subsets.shape == (25, 4)
    assert sorted(os.listdir(tmp_path)) == ["ksm", "report", "taken"]  # no staging or old copy left beside it


def test_a_second_analysis_into_the_same_out_is_refused_before_its_work(ksm, tmp_path, capsys, monkeypatch):
    """Issue 23 item 10c: two analyses into one --out both exited 0, one silently replacing the other."""
    out, real, calls, inner = tmp_path / "r", analysis_module.analyze_store, [], []

    def analyze_store(*args, **kwargs):  # while the first analysis runs, a second one starts
        calls.append(1)
        if len(calls) == 1:
            inner.append(main(["analyze", str(ksm), "--out", str(out), "--n-subsets", "25", *FAST]))
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "analyze_store", analyze_store)
    code, _, err = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 20, *FAST)
    assert code == 0 and inner == [2] and len(calls) == 1  # refused before its analysis
    assert "--force" in err and "another analysis" in err and str(out) in err
    assert AttributionReport.load(out).subsets.shape == (20, 4) and sorted(os.listdir(tmp_path)) == ["ksm", "r"]
    assert ".analysis-in-progress" not in os.listdir(out)
    # A failed analysis releases its claim: the directory can be used again.
    monkeypatch.setattr(analysis_module, "analyze_store", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    code, _, err = _run(capsys, "analyze", ksm, "--out", tmp_path / "r2", "--n-subsets", 20)
    assert code == 2 and "boom" in err and not (tmp_path / "r2").exists()


def test_force_replaces_a_report_whole_or_not_at_all(ksm, tmp_path, capsys, monkeypatch):
    """Issue 23 item 10c: with --force the old report is replaced atomically (never a mix of two)."""
    from lightning_ksm.report import files as report_files

    out = tmp_path / "r"
    assert _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 20, *FAST)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    real, writes = report_files.atomic_write_bytes, []

    def fails_midway(path, data, **kwargs):  # the disk fills after a few of the new report's files
        writes.append(path)
        if len(writes) > 3:
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(report_files, "atomic_write_bytes", fails_midway)
    code, _, err = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 25, "--force", *FAST)
    assert code == 1 and "cannot write the report" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # the old report, untouched
    assert sorted(os.listdir(tmp_path)) == ["ksm", "r"]  # the half-written new one was removed
    monkeypatch.undo()
    # Two --force analyses at once: both succeed, the directory holds one whole report.
    real_analyze, calls, inner = analysis_module.analyze_store, [], []

    def analyze_store(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            inner.append(main(["analyze", str(ksm), "--out", str(out), "--n-subsets", "30", "--force", *FAST]))
        return real_analyze(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "analyze_store", analyze_store)
    code, _, _ = _run(capsys, "analyze", ksm, "--out", out, "--n-subsets", 25, "--force", *FAST)
    assert code == 0 and inner == [0]
    report = AttributionReport.load(out)  # every array matches its checksum in report.json
    assert report.subsets.shape == (25, 4) and report.config["analysis"]["n_subsets"] == 25
    assert sorted(os.listdir(tmp_path)) == ["ksm", "r"]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--n-subsets", "5"], ["--n-subsets", ">= 10"]),
        (["--n-subsets", "many"], ["--n-subsets", "integer"]),
        (["--subset-p", "0.5", "--subset-size", "2"], ["--subset-size", "--subset-p"]),
        (["--subset-size", "9"], ["--subset-size", "number of tasks (4)"]),
        (["--subset-p", "1.5"], ["--subset-p"]),
        (["--kernel", "cubic"], ["--kernel", "rbf, poly, linear"]),
        (["--lam", "0"], ["--lam", "> 0"]),
        (["--gamma", "-1"], ["--gamma"]),
        (["--holdout", "0.95"], ["--holdout"]),
        (["--n-groups", "7"], ["--n-groups"]),
        (["--best-subset-size", "0"], ["--best-subset-size"]),
        (["--loss", "hinge"], ["--loss", "squared"]),
        (["--bogus", "1"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_analyze_bad_settings_name_the_option(ksm, capsys, no_analysis, argv, needles):
    code, _, err = _run(capsys, "analyze", ksm, *argv)
    assert code == 2
    for needle in needles:
        assert needle in err
    assert not [p for p in os.listdir(ksm) if p.startswith("report")]


def test_analyze_bad_directories_and_config_files(ksm, tmp_path, capsys, no_analysis):
    code, _, err = _run(capsys, "analyze", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "analyze", empty)
    assert code == 2 and "no harvest" in err and str(empty) in err
    partial = _write_harvest(tmp_path / "partial", splits=("source",))
    code, _, err = _run(capsys, "analyze", partial)
    assert code == 3 and "'target'" in err and "incomplete" in err  # an incomplete harvest: exit 3, as documented
    code, _, err = _run(capsys, "analyze", ksm, "--out", ksm / "harvest" / "inside")
    assert code == 2 and "inside the harvest" in err

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"n_subsets": 20, "n_subset": 30}))
    code, _, err = _run(capsys, "analyze", ksm, "--config", unknown)
    assert code == 2 and "--config" in err and "'n_subset'" in err
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text(json.dumps({"kernel": "cubic"}))
    code, _, err = _run(capsys, "analyze", ksm, "--config", bad_value)
    assert code == 2 and "'kernel'" in err and "rbf, poly, linear" in err
    too_few = tmp_path / "too_few.json"
    too_few.write_text(json.dumps({"n_subsets": 3}))
    code, _, err = _run(capsys, "analyze", ksm, "--config", too_few)
    assert code == 2 and "--config" in err and "n_subsets must be an integer >= 10" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = _run(capsys, "analyze", ksm, "--config", broken)
    assert code == 2 and "not valid JSON" in err


def _analysis_flags() -> list:
    """The option of every AnalysisConfig field, from the one source of the settings (config)."""
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(config.AnalysisConfig)]


def test_every_analysis_setting_has_an_option():
    from lightning_ksm import surrogates

    # the public AnalysisConfig and config's have the same fields
    assert {f.name for f in dataclasses.fields(config.AnalysisConfig)} == {f.name for f in dataclasses.fields(AnalysisConfig)}
    parser = cli.build_parser()
    analyze = parser._subparsers._group_actions[0].choices["analyze"]
    by_dest = {a.dest: a for a in analyze._actions if a.option_strings}
    for f, flag in zip(dataclasses.fields(config.AnalysisConfig), _analysis_flags()):
        assert flag in by_dest[f.name].option_strings
    # the choices shown come from config
    assert by_dest["loss"].metavar == "{" + ",".join(config.LOSSES + ("auto",)) + "}"
    assert by_dest["weighting"].metavar == "{" + ",".join(config.WEIGHTINGS) + "}"
    assert by_dest["kernel"].metavar == "{" + ",".join(config.KERNELS) + "}"
    assert set(config.KERNELS) <= set(surrogates._KERNELS)
    # the help is config's, with the default
    assert "surrogate kernel (default: rbf)" in by_dest["kernel"].help
    assert by_dest["n_subsets"].help.startswith(config.describe(config.AnalysisConfig)[0]["help"])


@pytest.mark.parametrize(
    "name, value",
    [("seed", "x"), ("gamma", "-1"), ("alpha", "0"), ("best_subset_size", "0"), ("kernel", "foo"),
     ("n_subsets", "2.5"), ("lam", "nan")],
)
def test_bad_values_exit_2_and_name_the_setting(ksm, tmp_path, capsys, no_analysis, name, value):
    flag = "--" + name.replace("_", "-")
    code, _, err = _run(capsys, "analyze", ksm, flag, value)
    assert code == 2
    assert f"argument {flag}: {name} must " in err  # config's message, after the flag
    # the same value from a --config file: the same check, naming the file and the setting
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({name: value}))
    code, _, err = _run(capsys, "analyze", ksm, "--config", settings)
    assert code == 2
    assert "--config" in err and f"setting {name!r}: {name} must " in err


def test_config_values_are_typed_like_options(ksm, tmp_path, capsys, monkeypatch):
    """JSON numbers, 'auto' strings and null in a --config file read like the options."""
    seen = {}

    def stop(directory, cfg, **kwargs):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(analysis_module, "analyze_store", stop)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"n_subsets": 20.0, "lam": 1, "gamma": "auto", "alpha": None, "kernel": "RBF"}))
    code, _, err = _run(capsys, "analyze", ksm, "--config", settings, "--seed", "3", "--n-groups", "auto")
    assert code == 2 and "stop here" in err
    cfg = seen["cfg"]
    assert (cfg.n_subsets, cfg.lam, cfg.gamma, cfg.alpha, cfg.kernel, cfg.seed, cfg.n_groups) == (
        20, 1.0, None, None, "rbf", 3, None)
    assert type(cfg.n_subsets) is int and type(cfg.lam) is float


# -- show ----------------------------------------------------------------------------------------


@pytest.fixture
def with_report(ksm, capsys) -> Path:
    """The output directory with a report/ written by analyze (like the callback's)."""
    code, _, _ = _run(capsys, "analyze", ksm, "--out", ksm / "report", "--n-subsets", 30, "--seed", 1,
                      "--n-groups", 2, *FAST)
    assert code == 0
    return ksm


def test_show_prints_tasks_in_ranked_order(with_report, capsys):
    report = AttributionReport.load(with_report / "report")
    code, text, _ = _run(capsys, "show", with_report)
    assert code == 0
    assert "(> 0: the task helps)" in text
    for target in report.target_names:
        assert _ranks_in_text(text, target) == [t for t, _ in report.ranked(target)]
    # the planted answer, read from the terminal output
    assert _ranks_in_text(text, "oppose")[0] == "oppose"
    assert set(_ranks_in_text(text, "agree_b")[:2]) == {"agree_a", "agree_b"}
    assert _ranks_in_text(text, "agree_b")[-1] == "oppose"
    assert "== recommended co-training groups ==" in text

    code, text, _ = _run(capsys, "show", with_report / "report", "--target", "oppose", "--method", "loo")
    assert code == 0
    assert "== target 'oppose' ==" in text and "== target 'agree_a' ==" not in text
    assert "loo*" in text
    assert _ranks_in_text(text, "oppose") == [t for t, _ in report.ranked("oppose", "loo")]

    code, text, _ = _run(capsys, "show", with_report, "--target", "agree_a", "--rows", 2)
    assert code == 0
    shown = _ranks_in_text(text, "agree_a")
    full = [t for t, _ in report.ranked("agree_a")]
    assert shown == [full[0], full[-1]] and "2 more tasks not shown" in text


def test_show_json(with_report, capsys):
    report = AttributionReport.load(with_report / "report")
    code, out, _ = _run(capsys, "show", with_report, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["task_names"] == TASKS and data["method"] == "ensemble"
    assert set(data["rankings"]) == set(report.target_names)
    for target, rows in data["rankings"].items():
        assert [r["task"] for r in rows] == [t for t, _ in report.ranked(target)]
        assert [r["rank"] for r in rows] == [1, 2, 3, 4]
        for r in rows:
            k, t = report.task_index(r["task"]), report.target_index(target)
            assert r["score"] == report.scores["ensemble"][k, t]
            assert r["scores"]["loo"] == report.scores["loo"][k, t]
    assert data["groups"] == report.groups
    assert data["config"]["analysis"]["n_subsets"] == 30
    code, out, _ = _run(capsys, "show", with_report, "--json", "--target", "oppose", "--method", "linear", "--rows", 1)
    data = json.loads(out)
    assert list(data["rankings"]) == ["oppose"] and data["method"] == "linear"
    assert [r["task"] for r in data["rankings"]["oppose"]] == [report.ranked("oppose", "linear")[0][0]]
    assert [e["target"] for e in data["best_subsets"]] == ["oppose"]


def test_show_errors_list_what_exists(with_report, tmp_path, capsys):
    code, _, err = _run(capsys, "show", with_report, "--target", "nope")
    assert code == 2 and "--target" in err and "'nope'" in err
    for name in ("agree_a", "agree_b", "oppose", "noise", "all"):
        assert f"'{name}'" in err
    code, _, err = _run(capsys, "show", with_report, "--method", "shapley")
    assert code == 2 and "--method" in err and "'ensemble', 'loo', 'linear'" in err
    code, _, err = _run(capsys, "show", with_report / "harvest")
    assert code == 2 and "no report" in err
    code, _, err = _run(capsys, "show", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    # a directory holding only reports made by analyze: point at them
    os.rename(with_report / "report", with_report / "report-x")
    code, _, err = _run(capsys, "show", with_report)
    assert code == 2 and "report-x" in err
    code, _, err = _run(capsys, "show", with_report, "--rows", "0")
    assert code == 2 and "--rows" in err
    code, text, _ = _run(capsys, "show", with_report / "report-x", "--rows", "all")
    assert code == 0 and "more tasks not shown" not in text
    code, _, err = _run(capsys, "show", with_report, "--rows", "many")
    assert code == 2 and "--rows" in err
    (with_report / "report-x" / "report.json").write_text("{broken")
    code, _, err = _run(capsys, "show", with_report / "report-x")
    assert code == 2 and "report.json" in err


# -- help, version, the real console script --------------------------------------------------------


def test_help_and_version_in_process(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and re.fullmatch(r"lightning-ksm \d+\.\d+\.\d+\S*\n", out)
    code, out, _ = _run(capsys, "analyze", "--help")
    assert code == 0
    for flag in ["--out", "--force", "--config", "--progress", *_analysis_flags()]:
        assert flag in out
    assert "score > 0" in out and "< 0: synergy" in out and "examples:" in out
    code, out, _ = _run(capsys, "show", "--help")
    assert code == 0 and "--json" in out and "score > 0" in out and "examples:" in out
    code, _, err = _run(capsys)
    assert code == 2 and "COMMAND" in err


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "lightning_ksm.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("lightning-ksm "), res.stderr


def test_console_script_help_and_no_lightning_import(with_report):
    script = Path(sys.executable).parent / "lightning-ksm"
    if not script.exists():
        pytest.skip(f"{script} is missing: run `pip install -e . --no-deps` to create the console script")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for needle in ("analyze", "show", "score > 0", "< 0: synergy", "examples:"):
        assert needle in res.stdout
    # analyze + show in a fresh interpreter must never import Lightning (import time; engine only).
    code = (
        "import sys; from lightning_ksm.cli import main\n"
        f"assert main(['analyze', {str(with_report)!r}, '--n-subsets', '20', '--ensemble-samples', '300', '--out', {str(with_report / 'r')!r}]) == 0\n"
        f"assert main(['show', {str(with_report / 'r')!r}]) == 0\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout
