import numpy as np
import pytest

from lightning_ksm import AnalysisConfig, all_subsets, report_from_losses, run_analysis
from lightning_ksm.features import HarvestedFeatures

from conftest import planted, regression_features as _regression_features


def test_report_from_planted_losses():
    K = 6
    F, w = planted.additive(K, seed=3)
    S = all_subsets(K)
    names = [f"t{k}" for k in range(K)]
    report = report_from_losses(S, F(S), names, ["all"], {"n_subsets": 63, "seed": 1})
    np.testing.assert_allclose(report.scores["loo"][:, 0], w, atol=1e-3)
    np.testing.assert_allclose(report.scores["linear"][:, 0], w, atol=1e-6)
    assert [t for t, _ in report.ranked(method="loo")] == [names[i] for i in np.argsort(-w)]
    assert set(report.best_subsets[0]["tasks"]) == {names[i] for i in np.flatnonzero(w > 0)}
    assert report.fit_quality["heldout_lds"] > 0.95
    assert report.groups == []  # the tasks are not targets: no groups, and a note says why
    assert "co-training groups" in report.fit_quality["notes"][0]


def test_run_analysis_ranks_helpful_and_harmful_tasks():
    source, target = _regression_features()
    report = run_analysis(source, target, AnalysisConfig(n_subsets=40, subset_p=0.5, lam=0.1))
    ranked = [t for t, _ in report.ranked(target="all")]
    assert ranked[0] == "same" and ranked[-1] == "opposite"
    scores = dict(report.ranked(target="all"))
    assert scores["same"] > 0 > scores["opposite"]
    assert report.target_names == ["target", "all"]
    assert report.best_subsets[-1]["tasks"] == ["same"]
    assert set(report.timings) >= {"gradex", "surrogate", "readouts"}
    again = run_analysis(source, target, AnalysisConfig(n_subsets=40, subset_p=0.5, lam=0.1))
    np.testing.assert_array_equal(report.scores["ensemble"], again.scores["ensemble"])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"n_subset": 10}, "unknown analysis setting"),
        ({"n_subsets": 5}, "n_subsets"),
        ({"subset_p": 1.0}, "subset_p"),
        ({"lam": 0.0}, "lam"),
        ({"kernel": "cosine"}, "kernel"),
        ({"weighting": "uniform"}, "weighting"),
        ({"holdout": 0.95}, "holdout"),
        ({"n_groups": 4}, "n_groups"),
        ({"subset_size": 4}, "subset_size"),
    ],
)
def test_bad_settings_fail_before_any_work(settings, match):
    source, target = _regression_features()
    with pytest.raises(ValueError, match=match):
        run_analysis(source, target, settings)


def test_analyze_is_one_entry_point_for_features_a_directory_and_measured_outcomes(tmp_path):
    from lightning_ksm import analyze
    from lightning_ksm.rundir import RunDirectory
    from lightning_ksm.store import FeatureStore

    source, target = _regression_features()
    cfg = AnalysisConfig(n_subsets=40, subset_p=0.5, lam=0.1)
    direct = run_analysis(source, target, cfg)
    same = analyze(source, target, cfg)
    np.testing.assert_array_equal(same.losses, direct.losses)
    np.testing.assert_array_equal(same.scores["ensemble"], direct.scores["ensemble"])
    # a callback-style run directory holding harvest/
    store = FeatureStore(RunDirectory(str(tmp_path)).harvest)
    store.initialize(projector_config={"kind": "identity", "k": source.proj_dim, "seed": 0, "version": 1},
                     mode="regression", params={"w": (source.proj_dim,)},
                     task_names=source.task_names + target.task_names)
    for split, f in (("source", source), ("target", target)):
        store.write_shard(split, 0, outputs=f.outputs, jacobians=f.jacobians, labels=f.labels,
                          task_ids=f.task_ids, task_values=f.task_names)
    from_dir = analyze(str(tmp_path), config=cfg)
    np.testing.assert_allclose(from_dir.losses, direct.losses, rtol=1e-5, atol=1e-6)
    measured = analyze(subsets=direct.subsets, losses=direct.losses, task_names=direct.task_names,
                       target_names=direct.target_names, config=cfg)
    np.testing.assert_allclose(measured.scores["loo"], direct.scores["loo"])
    with pytest.raises(ValueError, match="needs task_names"):
        analyze(subsets=direct.subsets, losses=direct.losses)
    with pytest.raises(TypeError, match="takes a harvest directory"):
        analyze(42)
