import numpy as np
import pytest
from itertools import combinations

from lightning_ksm import (
    KernelSurrogate,
    LinearSurrogate,
    all_subsets,
    best_subset,
    cotraining_groups,
    ensemble_scores,
    interaction_matrix,
    loo_scores,
    sample_subsets,
)
from lightning_ksm.readouts import task_affinity
from lightning_ksm.quality import holdout_quality

from conftest import planted


class Exact:
    """A 'surrogate' that is the planted function itself, for checking readouts exactly."""

    def __init__(self, F, K, n_outputs=1):
        self.F, self.n_features_in_, self.n_outputs_ = F, K, n_outputs
        self.single_output_ = n_outputs == 1 and F(np.ones((1, K))).ndim == 1

    def predict(self, S):
        return self.F(S)


def test_loo_scores_and_interactions_by_definition():
    K = 5
    F = planted.pairwise(K, pair=(1, 3), strength=2.0)
    g = Exact(F, K)
    full = F(np.ones((1, K)))[0]
    for k in range(K):
        s = np.ones((1, K))
        s[0, k] = 0
        assert loo_scores(g)[k] == pytest.approx(F(s)[0] - full)
    I = interaction_matrix(g)
    assert I.shape == (K, K) and np.allclose(I, I.T) and np.allclose(np.diag(I), 0)
    # The pair that only helps together is synergistic: negative interaction, the largest in size.
    assert I[1, 3] == pytest.approx(-2.0)
    off = np.abs(I[~np.eye(K, dtype=bool)])
    assert np.abs(I[1, 3]) == off.max() and np.sort(off)[-3] < 1e-9


def test_redundant_pair_has_positive_interaction():
    K = 4
    # Either task 0 or task 2 gives the whole benefit (OR): removing one alone costs nothing.
    F = lambda S: 1.0 - np.maximum(np.asarray(S)[:, 0], np.asarray(S)[:, 2])  # noqa: E731
    I = interaction_matrix(Exact(F, K))
    assert I[0, 2] == pytest.approx(1.0)


def test_interactions_put_planted_pair_on_top_from_fitted_kernel():
    K = 8
    for pair, fn in [((1, 4), planted.pairwise), ((0, 3), planted.xor)]:
        F = fn(K, pair=pair)
        train, _ = planted.split(K, 4 * K, seed=0)
        I = interaction_matrix(KernelSurrogate().fit(train, F(train)))
        top = np.unravel_index(np.argmax(np.abs(I)), I.shape)
        assert tuple(sorted(top)) == pair


def test_ensemble_scores_match_additive_effects():
    K = 10
    F, w = planted.additive(K, seed=4)
    model = LinearSurrogate().fit(sample_subsets(K, 60, p=0.5, seed=0), F(sample_subsets(K, 60, p=0.5, seed=0)))
    scores = ensemble_scores(model, n_samples=20000, seed=1)
    np.testing.assert_allclose(scores, w, atol=0.1)
    clear = np.abs(w) > 0.1
    assert np.array_equal(np.sign(scores[clear]), np.sign(w[clear]))
    assert np.array_equal(scores, ensemble_scores(model, n_samples=20000, seed=1))


def test_readouts_keep_multi_target_shape():
    K, T = 6, 3
    S = sample_subsets(K, 40, p=0.5, seed=0)
    y = np.random.default_rng(0).normal(size=(40, T))
    model = KernelSurrogate().fit(S, y)
    assert loo_scores(model).shape == (K, T)
    assert ensemble_scores(model, n_samples=500).shape == (K, T)
    assert interaction_matrix(model).shape == (T, K, K)


@pytest.mark.parametrize("size", [None, 3])
def test_best_subset_equals_brute_force(size):
    K = 9
    F = planted.pairwise(K, pair=(2, 5))
    train, _ = planted.split(K, 40, seed=2)
    model = KernelSurrogate().fit(train, F(train))
    every = all_subsets(K)
    if size is not None:
        every = every[every.sum(axis=1) == size]
    pred = model.predict(every)
    truth = every[np.argmin(pred)]
    exact = best_subset(model, size=size)
    assert exact.exact and np.array_equal(exact.mask, truth)
    assert exact.predicted_loss == pytest.approx(pred.min())
    local = best_subset(model, size=size, max_exact=0, seed=3)
    assert not local.exact and np.array_equal(local.mask, truth)


def test_best_subset_by_target_name_and_bad_targets():
    K = 5
    S = sample_subsets(K, 30, p=0.5, seed=0)
    F, w = planted.additive(K)
    y = np.stack([F(S), -F(S)], axis=1)
    model = LinearSurrogate().fit(S, y)
    lo = best_subset(model, target="a", target_names=["a", "b"])
    hi = best_subset(model, target=-1)
    assert np.array_equal(lo.mask, w > 0) and np.array_equal(hi.mask, w < 0)
    with pytest.raises(ValueError, match="out of range"):
        best_subset(model, target=2)
    with pytest.raises(ValueError, match="unknown target 'c'"):
        best_subset(model, target="c", target_names=["a", "b"])
    with pytest.raises(ValueError, match="size"):
        best_subset(model, size=K + 1)


def test_cotraining_groups_recover_planted_clusters():
    # Tasks 0-3 help each other, tasks 4-7 help each other, the two blocks hurt each other.
    K = 8
    block = np.repeat([0, 1], 4)
    same = block[:, None] == block[None, :]
    effect = np.where(same, 0.5, -0.3)  # effect[source, target]: loss drop when the source is in

    def F(S):
        return 2.0 - np.asarray(S, float) @ effect

    S = sample_subsets(K, 60, p=0.5, seed=0)
    model = KernelSurrogate().fit(S, F(S))
    groups = cotraining_groups(model, 2, target_columns=np.arange(K), seed=0)
    assert sorted(sorted(g.tasks) for g in groups) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Training each block alone beats training on everything for its own tasks.
    for g in groups:
        assert g.predicted_loss < g.all_tasks_loss
        assert g.predicted_loss == pytest.approx(np.mean(g.member_losses))
    assert cotraining_groups(model, 2, target_columns=np.arange(K), seed=0)[0].tasks == groups[0].tasks


def test_cotraining_and_affinity_bad_input():
    K = 4
    S = sample_subsets(K, 20, p=0.5, seed=0)
    model = LinearSurrogate().fit(S, np.random.default_rng(0).normal(size=(20, K)))
    with pytest.raises(ValueError, match="n_groups"):
        cotraining_groups(model, 5, target_columns=np.arange(K))
    with pytest.raises(ValueError, match="target_columns"):
        cotraining_groups(model, 2, target_columns=np.arange(3))
    with pytest.raises(ValueError, match="target_columns"):
        cotraining_groups(model, 2, target_columns=np.array([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="square"):
        task_affinity(np.ones((2, 3)))
    A = task_affinity(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert A[0, 1] > 1.0 and A[0, 0] == 1.0


def test_unfitted_surrogate_is_refused():
    with pytest.raises(ValueError, match="not a fitted surrogate"):
        loo_scores(KernelSurrogate())


def test_holdout_quality_on_additive_function():
    K = 8
    F, _ = planted.additive(K)
    S = sample_subsets(K, 50, p=0.5, seed=0, unique=True)
    q = holdout_quality(KernelSurrogate(), S, F(S), holdout=0.2, seed=0)
    assert q["heldout_lds"] > 0.95 and q["n_heldout_subsets"] == 10 and q["n_train_subsets"] == 40
    with pytest.raises(ValueError, match="holdout"):
        holdout_quality(KernelSurrogate(), S, F(S), holdout=1.5)


def test_holdout_never_scores_on_subsets_seen_in_training():
    K = 4  # 15 distinct subsets, so 60 samples repeat them
    F, _ = planted.additive(K)
    S = sample_subsets(K, 60, p=0.5, seed=0)
    rng = np.random.default_rng(0)
    y = F(S) + 0.01 * rng.normal(size=60)
    q = holdout_quality(LinearSurrogate(), S, y, holdout=0.2, seed=0)
    distinct = len(np.unique(S, axis=0))
    assert q["n_train_subsets"] + q["n_heldout_subsets"] == 60
    # Re-derive the split: no held-out subset appears among the training rows.
    _, group = np.unique(S, axis=0, return_inverse=True)
    held = np.random.default_rng(0).permutation(distinct)[: max(2, round(0.2 * distinct))]
    test_rows = S[np.isin(group.ravel(), held)]
    train_rows = S[~np.isin(group.ravel(), held)]
    assert not any((train_rows == r).all(axis=1).any() for r in test_rows)
    assert len(test_rows) == q["n_heldout_subsets"]
