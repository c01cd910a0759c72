import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from lightning_ksm import lds, pearson, relative_error, residual_error


def test_lds_is_mean_columnwise_spearman():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 4))
    b = a + rng.normal(scale=1.0, size=(30, 4))
    b[:5, 0] = b[5, 0]  # ties
    expected = np.mean([spearmanr(a[:, t], b[:, t]).statistic for t in range(4)])
    assert lds(a, b) == pytest.approx(expected, abs=1e-12)
    assert lds(a[:, 1], b[:, 1]) == pytest.approx(spearmanr(a[:, 1], b[:, 1]).statistic)


def test_lds_is_invariant_to_monotone_maps_and_flips_sign():
    a = np.random.default_rng(1).normal(size=40)
    assert lds(a, np.exp(3 * a)) == pytest.approx(1.0)
    assert lds(a, -a) == pytest.approx(-1.0)


def test_lds_skips_and_counts_constant_columns():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20, 3))
    b = a.copy()
    a[:, 1] = 5.0
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        res = lds(a, b, return_per_column=True)
    assert res.n_skipped == 1 and np.isnan(res.per_column[1])
    assert res.mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="every target column is constant"):
        lds(np.ones((5, 2)), np.ones((5, 2)))


def test_pearson_and_residual_error_closed_forms():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(25, 2))
    b = 2 * a + rng.normal(size=(25, 2))
    assert pearson(a, b) == pytest.approx(np.mean([pearsonr(a[:, t], b[:, t]).statistic for t in range(2)]))
    assert residual_error(a, a) == 0.0
    assert residual_error(a, np.broadcast_to(a.mean(axis=0), a.shape)) == pytest.approx(1.0)
    expected = np.mean(((a - b) ** 2).sum(0) / ((a - a.mean(0)) ** 2).sum(0))
    assert residual_error(a, b) == pytest.approx(expected)


def test_relative_error():
    truth = np.array([1.0, 2.0, 4.0])
    assert relative_error(truth * 1.1, truth) == pytest.approx(0.1)
    assert relative_error(np.array([1.0, 2.0, 5.0]), truth, reduce="mean") == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="zeros"):
        relative_error(truth, np.array([0.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.ones(5), np.ones(4), "shape"),
        (np.ones(1), np.ones(1), "at least 2"),
        (np.array([1.0, np.nan, 2.0]), np.ones(3), "y_true contains a non-finite"),
        (np.ones(3), np.array([1.0, np.inf, 2.0]), "y_pred contains a non-finite"),
        (np.ones((3, 2, 2)), np.ones((3, 2, 2)), r"\(m,\) or \(m, T\)"),
    ],
)
def test_bad_metric_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        lds(a, b)
