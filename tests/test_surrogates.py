import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from lightning_ksm import KernelSurrogate, LinearSurrogate, lds, loo_scores, sample_subsets
from lightning_ksm.metrics import residual_error

from conftest import planted


@pytest.mark.parametrize("K", [6, 10])
@pytest.mark.parametrize("make", [LinearSurrogate, KernelSurrogate])
def test_additive_function_is_recovered(K, make):
    F, w = planted.additive(K, seed=K)
    train, test = planted.split(K, 4 * K, seed=1)
    model = make().fit(train, F(train))
    assert lds(F(test), model.predict(test)) >= 0.95
    scores = loo_scores(model)
    # Removing task k raises the loss by w_k: same signs, nearly the same values.
    assert np.array_equal(np.sign(scores), np.sign(w))
    np.testing.assert_allclose(scores, w, atol=0.05 * np.abs(w).max())


@pytest.mark.parametrize("planted_fn", [planted.pairwise, planted.xor])
def test_kernel_beats_linear_on_interactions(planted_fn):
    K = 8
    F = planted_fn(K)
    gaps = []
    for seed in range(3):
        train, test = planted.split(K, 4 * K, seed=seed)
        lin = LinearSurrogate().fit(train, F(train))
        ker = KernelSurrogate().fit(train, F(train))
        gaps.append(lds(F(test), ker.predict(test)) - lds(F(test), lin.predict(test)))
    assert np.mean(gaps) >= 0.2, gaps


def _mixed_targets(K, n_targets, seed):
    """Many target columns, each a random mix of additive, pairwise and XOR effects plus noise."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(K, n_targets))
    pairs = rng.integers(0, K, size=(n_targets, 2))
    amp = rng.uniform(0.5, 2.0, size=n_targets)

    def F(S):
        S = np.asarray(S, float)
        inter = S[:, pairs[:, 0]] * S[:, pairs[:, 1]] - 0.5 * np.abs(S[:, pairs[:, 0]] - S[:, pairs[:, 1]])
        return S @ W * 0.3 + amp * inter

    return F


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_selection_does_not_lose_to_paper_setting(seed):
    # 40 subsets, 300 target columns, noisy: the setting the default must hold up in.
    K = 12
    F = _mixed_targets(K, 300, seed)
    rng = np.random.default_rng(100 + seed)
    S = sample_subsets(K, 40, p=0.5, seed=seed)
    y = F(S) + 0.1 * rng.normal(size=(40, 300))
    test = sample_subsets(K, 300, p=0.5, seed=1000 + seed)
    truth = F(test)
    auto = KernelSurrogate().fit(S, y)
    paper = KernelSurrogate(gamma=1.0 / K, alpha=0.1).fit(S, y)
    err_auto = residual_error(truth, auto.predict(test))
    err_paper = residual_error(truth, paper.predict(test))
    assert err_auto <= err_paper * 1.02, (err_auto, err_paper)
    assert lds(truth, auto.predict(test)) >= lds(truth, paper.predict(test)) - 0.01


def test_closed_form_loo_matches_brute_force():
    K, m = 7, 30
    S = sample_subsets(K, m, p=0.5, seed=3).astype(float)
    y = np.random.default_rng(0).normal(size=(m, 2))
    grid = dict(gamma_grid=[0.05, 0.3], alpha_grid=[1e-3, 0.1, 1.0])
    model = KernelSurrogate(**grid).fit(S, y)
    # Brute force on the same centred targets, refitting kernel ridge without row i.
    yc = y - y.mean(axis=0)
    scale = yc.std(axis=0)
    for gi, gamma in enumerate(grid["gamma_grid"]):
        G = np.exp(-gamma * ((S[:, None, :] - S[None, :, :]) ** 2).sum(-1))
        for ai, alpha in enumerate(grid["alpha_grid"]):
            errs = []
            for i in range(m):
                keep = np.arange(m) != i
                theta = np.linalg.solve(G[np.ix_(keep, keep)] + alpha * np.eye(m - 1), yc[keep] / scale)
                errs.append((yc[i] / scale - G[i, keep] @ theta) ** 2)
            assert model.cv_results_["loo_mse"][gi, ai] == pytest.approx(np.mean(errs), rel=1e-6)
    best = np.unravel_index(np.argmin(model.cv_results_["loo_mse"]), (2, 3))
    assert (model.gamma_, model.alpha_) == (grid["gamma_grid"][best[0]], grid["alpha_grid"][best[1]])


def test_kernel_ridge_matches_sklearn_with_fixed_parameters():
    from sklearn.kernel_ridge import KernelRidge

    S = sample_subsets(9, 50, p=0.4, seed=0).astype(float)
    y = np.random.default_rng(1).normal(size=50)
    for kernel, extra in [("rbf", {}), ("poly", dict(degree=3, coef0=1.0)), ("linear", {})]:
        ours = KernelSurrogate(kernel=kernel, gamma=0.2, alpha=0.3, **extra).fit(S, y)
        ref_params = dict(extra, gamma=0.2) if kernel != "linear" else {}
        ref = KernelRidge(kernel=kernel, alpha=0.3, **ref_params).fit(S, y - y.mean())
        test = sample_subsets(9, 20, p=0.5, seed=5)
        np.testing.assert_allclose(ours.predict(test), ref.predict(test) + y.mean(), rtol=1e-8, atol=1e-10)


def test_linear_is_minimum_norm_when_fewer_subsets_than_tasks():
    K, m = 20, 8
    S = sample_subsets(K, m, p=0.5, seed=0).astype(float)
    y = np.random.default_rng(0).normal(size=m)
    model = LinearSurrogate().fit(S, y)
    Sc, yc = S - S.mean(axis=0), y - y.mean()
    np.testing.assert_allclose(model.coef_, np.linalg.pinv(Sc) @ yc, atol=1e-8)
    np.testing.assert_allclose(model.predict(S), y, atol=1e-8)  # interpolates


def test_linear_ridge_shrinks_towards_zero():
    S = sample_subsets(6, 30, p=0.5, seed=0)
    F, _ = planted.additive(6)
    free = LinearSurrogate().fit(S, F(S))
    ridge = LinearSurrogate(alpha=10.0).fit(S, F(S))
    assert np.linalg.norm(ridge.coef_) < np.linalg.norm(free.coef_)


def test_output_shapes_follow_targets():
    S = sample_subsets(5, 20, p=0.5, seed=0)
    for make in (LinearSurrogate, KernelSurrogate):
        assert make().fit(S, np.arange(20.0)).predict(S).shape == (20,)
        pred = make().fit(S, np.ones((20, 1)) * np.arange(20.0)[:, None]).predict(S[:3])
        assert pred.shape == (3, 1)
        assert make().fit(S, np.random.default_rng(0).normal(size=(20, 4))).predict(S[:3]).shape == (3, 4)


def test_sklearn_estimator_protocol():
    S = sample_subsets(6, 60, p=0.5, seed=0)
    F = planted.xor(6)
    model = KernelSurrogate(kernel="poly", degree=2)
    assert clone(model).get_params()["degree"] == 2
    model.set_params(degree=3)
    assert model.degree == 3
    search = GridSearchCV(KernelSurrogate(), {"gamma": [0.01, 0.5], "alpha": [1e-4, 1.0]}, cv=3)
    search.fit(S, F(S))
    assert set(search.best_params_) == {"gamma", "alpha"}
    assert search.best_estimator_.predict(S).shape == (60,)
    assert GridSearchCV(LinearSurrogate(), {"alpha": [0.0, 1.0]}, cv=3).fit(S, F(S)).best_params_


def test_same_data_same_model():
    S = sample_subsets(8, 40, p=0.5, seed=0)
    y = np.random.default_rng(2).normal(size=(40, 3))
    a, b = KernelSurrogate().fit(S, y), KernelSurrogate().fit(S, y)
    assert (a.gamma_, a.alpha_) == (b.gamma_, b.alpha_)
    np.testing.assert_array_equal(a.predict(S), b.predict(S))


@pytest.mark.parametrize("make", [LinearSurrogate, KernelSurrogate])
@pytest.mark.parametrize(
    "S, y, match",
    [
        (np.ones((5, 4, 1)), np.ones(5), "2-D"),
        (np.full((5, 4), 0.5), np.ones(5), "binary"),
        (np.array([[1, 0, 2, 1]] * 5), np.ones(5), r"S\[0, 2\]"),
        (np.ones((5, 4)), np.ones(6), "rows"),
        (np.ones((5, 4)), np.array([1, 2, np.nan, 4, 5.0]), "non-finite"),
        (np.ones((5, 4)), np.array([1, 2, np.inf, 4, 5.0]), "non-finite"),
        (np.ones((1, 4)), np.ones(1), "at least 2"),
        (np.ones((5, 1)), np.ones(5), "at least 2 tasks"),
        (np.ones((5, 4)), np.ones((5, 2, 2)), "shape"),
    ],
)
def test_bad_input_is_named(make, S, y, match):
    with pytest.raises(ValueError, match=match):
        make().fit(S, y)


def test_bad_parameters_and_predict_shape():
    S = sample_subsets(4, 10, p=0.5, seed=0)
    with pytest.raises(ValueError, match="kernel"):
        KernelSurrogate(kernel="cosine").fit(S, np.ones(10))
    with pytest.raises(ValueError, match="alpha"):
        KernelSurrogate(alpha=-1.0).fit(S, np.arange(10.0))
    with pytest.raises(ValueError, match="gamma"):
        KernelSurrogate(gamma=0.0).fit(S, np.arange(10.0))
    with pytest.raises(ValueError, match="alpha"):
        LinearSurrogate(alpha=-0.1).fit(S, np.arange(10.0))
    model = KernelSurrogate().fit(S, np.arange(10.0))
    with pytest.raises(ValueError, match="4 tasks"):
        model.predict(np.ones((2, 5)))
