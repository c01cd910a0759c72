import numpy as np
import pytest

from lightning_ksm import AnalysisConfig, all_subsets, report_from_losses, run_analysis
from lightning_ksm.features import HarvestedFeatures

import planted


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


def _regression_features(seed=0, n=80, k=12):
    """Linear regression in the linearized space: f0 = 0, J = x. Task 0 follows the target's rule,
    task 1 the opposite rule, task 2 an unrelated one."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=k)
    rules = [w, -w, rng.normal(size=k)]
    X = rng.normal(size=(3 * n, k))
    t = np.repeat(np.arange(3), n)
    y = np.einsum("ij,ij->i", X, np.array(rules)[t]) + 0.1 * rng.normal(size=3 * n)
    source = HarvestedFeatures(np.zeros(3 * n), X, y, t, ["same", "opposite", "unrelated"], "regression")
    Xt = rng.normal(size=(60, k))
    target = HarvestedFeatures(np.zeros(60), Xt, Xt @ w, np.zeros(60, dtype=int), ["target"], "regression")
    return source, target


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
