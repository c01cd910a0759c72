import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ksm import (
    all_subsets,
    leave_one_out_subsets,
    leave_pair_out_subsets,
    sample_subsets,
)


@settings(max_examples=60, deadline=None)
@given(K=st.integers(2, 30), m=st.integers(1, 60), p=st.floats(0.05, 0.95), seed=st.integers(0, 10**6))
def test_bernoulli_rows_are_nonempty_and_seeded(K, m, p, seed):
    S = sample_subsets(K, m, p=p, seed=seed)
    assert S.shape == (m, K) and S.dtype == bool
    assert S.any(axis=1).all()
    assert np.array_equal(S, sample_subsets(K, m, p=p, seed=seed))


@settings(max_examples=60, deadline=None)
@given(K=st.integers(2, 30), m=st.integers(1, 60), data=st.data(), seed=st.integers(0, 10**6))
def test_fixed_size_rows_hold_exactly_size_tasks(K, m, data, seed):
    size = data.draw(st.integers(1, K))
    S = sample_subsets(K, m, size=size, seed=seed)
    assert (S.sum(axis=1) == size).all()


@settings(max_examples=40, deadline=None)
@given(K=st.integers(2, 8), seed=st.integers(0, 10**6), data=st.data())
def test_unique_rows_are_distinct(K, seed, data):
    m = data.draw(st.integers(1, 2**K - 1))
    S = sample_subsets(K, m, p=0.5, seed=seed, unique=True)
    assert len(np.unique(S, axis=0)) == m
    assert S.any(axis=1).all()


def test_inclusion_rate_matches_p_and_seeds_differ():
    S = sample_subsets(20, 5000, p=0.3, seed=1)
    assert abs(S.mean() - 0.3) < 0.01
    assert not np.array_equal(S, sample_subsets(20, 5000, p=0.3, seed=2))


def test_allow_empty_keeps_empty_rows():
    S = sample_subsets(2, 400, p=0.1, seed=0, allow_empty=True)
    assert (~S.any(axis=1)).sum() > 200  # (0.9)^2 = 81% of rows are empty


def test_leave_one_and_pair_out_designs():
    loo = leave_one_out_subsets(4)
    assert loo.shape == (5, 4) and loo[0].all()
    assert [int(np.flatnonzero(~r)[0]) for r in loo[1:]] == [0, 1, 2, 3]
    lpo = leave_pair_out_subsets(4)
    assert lpo.shape == (1 + 4 + 6, 4)
    assert ((~lpo[5:]).sum(axis=1) == 2).all()
    assert len(np.unique(lpo, axis=0)) == len(lpo)
    assert leave_pair_out_subsets(4, include_full=False, include_singles=False).shape == (6, 4)


def test_all_subsets_enumerates_every_nonempty_subset():
    S = all_subsets(5)
    assert S.shape == (31, 5) and len(np.unique(S, axis=0)) == 31 and S.any(axis=1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_tasks=1, n_subsets=3), "n_tasks"),
        (dict(n_tasks=5, n_subsets=0), "n_subsets"),
        (dict(n_tasks=5, n_subsets=3, size=6), "size"),
        (dict(n_tasks=5, n_subsets=3, size=0), "size"),
        (dict(n_tasks=5, n_subsets=3, p=1.0), "p must be"),
        (dict(n_tasks=5, n_subsets=3, p=0.5, size=2), "not both"),
        (dict(n_tasks=3, n_subsets=8, unique=True), "unique"),
        (dict(n_tasks=4, n_subsets=7, size=2, unique=True), "unique"),
    ],
)
def test_bad_sampler_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_subsets(**kwargs)
