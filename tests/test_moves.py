"""The incremental move scorer of the best-subset search (readouts/moves.py): the same numbers as
the surrogate's own predict and the support's own rule, and the same search result as the generic
path that builds every candidate."""

import numpy as np
import pytest

from lightning_ksm import KernelSurrogate, LinearSurrogate
from lightning_ksm.readouts import Support, best_subset
from lightning_ksm.readouts import selection
from lightning_ksm.readouts.moves import MoveScorer


def _fitted(kernel, K=14, m=60, seed=0):
    rng = np.random.default_rng(seed)
    S = rng.random((m, K)) < 0.6
    F = np.c_[S @ rng.normal(size=K) + 0.8 * S[:, 0] * S[:, 1], S @ rng.normal(size=K) - 0.5 * S[:, 2] * S[:, 3]]
    return S, KernelSurrogate(kernel=kernel).fit(S, F)


@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly"])
@pytest.mark.parametrize("mode", ["distance", "size", "none"])
def test_moves_equal_predict_and_the_support_rule(kernel, mode):
    S, sur = _fitted(kernel)
    K = S.shape[1]
    for radius in (None, 1, 3):
        sup = Support(S, mode, radius)
        for col in (0, 1):
            scorer = MoveScorer(sur, col, sup)
            for mask in (S[3], S[10], np.zeros(K, bool), np.ones(K, bool)):
                vals, oks, build = scorer.moves(mask, allow_resize=True)
                moves = build(np.arange(len(vals)))
                # every move is one swap, addition or removal, and each appears once
                assert (np.abs(moves.astype(int) - mask.astype(int)).sum(1) <= 2).all()
                assert len(np.unique(moves, axis=0)) == len(moves)
                np.testing.assert_allclose(vals, sur.predict(moves)[:, col], rtol=1e-9, atol=1e-9)
                np.testing.assert_array_equal(oks, sup.contains(moves))
                assert scorer.value(mask) == pytest.approx(float(sur.predict(mask[None])[0, col]), abs=1e-9)


@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly"])
@pytest.mark.parametrize("size", [None, 6])
def test_fast_search_finds_what_the_generic_search_finds(kernel, size, monkeypatch):
    S, sur = _fitted(kernel, seed=1)
    fast = [best_subset(sur, target=t, size=size, max_exact=10, seed=2, lower_bound=-1e9) for t in (0, 1)]
    monkeypatch.setattr(selection.MoveScorer, "applies", staticmethod(lambda s: False))
    slow = [best_subset(sur, target=t, size=size, max_exact=10, seed=2, lower_bound=-1e9) for t in (0, 1)]
    for a, b in zip(fast, slow):
        assert not a.exact and not b.exact
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.predicted_loss == pytest.approx(b.predicted_loss, abs=1e-9)
        assert a.n_evaluated == b.n_evaluated
        assert [m.tobytes() for m, _ in a.candidates] == [m.tobytes() for m, _ in b.candidates]
        assert (a.outside is None) == (b.outside is None)


def test_fast_search_reaches_the_brute_force_optimum_on_a_small_problem():
    S, sur = _fitted("rbf", K=10, m=80, seed=4)
    exact = best_subset(sur, target=0, seed=0)  # 1,023 candidates: enumerated
    local = best_subset(sur, target=0, max_exact=0, seed=0)
    assert exact.exact and not local.exact
    assert local.predicted_loss == pytest.approx(exact.predicted_loss, abs=1e-9)


def test_other_surrogates_use_the_generic_path():
    S, _ = _fitted("rbf")
    lin = LinearSurrogate().fit(S, S @ np.arange(S.shape[1], dtype=float))
    assert not MoveScorer.applies(lin) and not MoveScorer.applies(KernelSurrogate())
    assert best_subset(lin, max_exact=10).predicted_loss <= lin.predict(S).min() + 1e-9


def test_the_analysis_runs_with_its_threads_and_restores_the_process_setting(monkeypatch):
    import torch

    from conftest import regression_features
    from lightning_ksm import analyze
    import lightning_ksm.analysis as analysis

    seen = []
    original = analysis.estimate_subsets

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(analysis, "estimate_subsets", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        source, target = regression_features()
        analyze(source, target, {"n_subsets": 20, "n_bootstrap": 0, "threads": 1})
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored
        seen.clear()
        analyze(source, target, {"n_subsets": 20, "n_bootstrap": 0, "threads": 0})  # 0: left alone
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
