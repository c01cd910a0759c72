"""Tests of the retraining runner and the ground-truth comparison helpers (lightning_ksm.retrain)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lightning_ksm import KernelSurrogate, LinearSurrogate, sample_subsets
from lightning_ksm.retrain import (
    LightningTrainFn,
    compare_with_retraining,
    heldout_scores,
    retrain_subsets,
    select_samples,
)

# ---------------------------------------------------------------------------------------------
# A tiny real training problem (module level: picklable for the spawn workers)
# ---------------------------------------------------------------------------------------------

K_TINY = 4


def _tiny_data():
    g = torch.Generator().manual_seed(123)
    w_true = torch.tensor([1.0, -2.0, 0.5])
    X = torch.randn(K_TINY * 20, 3, generator=g)
    tasks = torch.arange(K_TINY).repeat_interleave(20)
    y = X @ w_true + 0.1 * torch.randn(len(X), generator=g)
    y[tasks == 3] = -y[tasks == 3]  # task 3 contradicts the others
    Xt = torch.randn(30, 3, generator=g)
    return X, y, tasks, Xt, Xt @ w_true


def tiny_train(subset, seed):
    """Linear regression trained by SGD from a random init drawn from the *global* torch RNG
    (which the runner seeds), so the result depends on the seed and on the subset."""
    X, y, tasks, Xt, yt = _tiny_data()
    keep = torch.as_tensor(np.asarray(subset, dtype=bool))[tasks]
    w = torch.randn(3) * 0.5
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[:16]]
        grad = 2 * X[idx].T @ (X[idx] @ w - y[idx]) / len(idx)
        w = w - 0.05 * grad
    return {"all": float(((Xt @ w - yt) ** 2).mean()), "first": float((Xt[:10] @ w - yt[:10]).pow(2).mean())}


class CountingTrain:
    """Counts its calls (serial runs only) and can fail on one subset row, like a killed job."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, subset, seed):
        key = tuple(np.flatnonzero(subset))
        if self.fail_on is not None and key == self.fail_on:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(key)
        return {"all": float(len(key)) + 0.01 * seed, "other": float(key[0])}


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def _design(m=6, K=K_TINY, seed=0):
    return sample_subsets(K, m, p=0.6, seed=seed, unique=True)


def test_resume_skips_finished_subsets(tmp_path):
    S = _design(6)
    # A first run "killed" at row 3 keeps rows 0..2 on disk.
    crashing = CountingTrain(fail_on=tuple(np.flatnonzero(S[3])))
    with pytest.raises(KeyboardInterrupt):
        retrain_subsets(crashing, S, directory=tmp_path, seed=2)
    assert len(crashing.calls) == 3
    assert sorted(os.listdir(tmp_path)) == [f"subset-0000{i}.json" for i in range(3)]

    counter = CountingTrain()
    res = retrain_subsets(counter, S, directory=tmp_path, seed=2)
    assert counter.calls == [tuple(np.flatnonzero(S[i])) for i in range(3, 6)]
    assert res.n_trained == 3
    np.testing.assert_allclose(res.column("all"), S.sum(1) + 0.02)
    np.testing.assert_allclose(res.column("other"), [np.flatnonzero(r)[0] for r in S])

    again = CountingTrain()
    res2 = retrain_subsets(again, S, directory=tmp_path, seed=2)
    assert again.calls == [] and res2.n_trained == 0
    np.testing.assert_array_equal(res2.losses, res.losses)

    rec = json.loads((tmp_path / "subset-00004.json").read_text())
    assert rec["subset"] == S[4].astype(int).tolist() and rec["seed"] == 2
    assert rec["losses"]["all"] == pytest.approx(S[4].sum() + 0.02)


def test_directory_of_another_design_is_refused(tmp_path):
    S = _design(4)
    retrain_subsets(CountingTrain(), S, directory=tmp_path, seed=0)
    other = S.copy()
    other[1, 0] = not other[1, 0]
    other[1, 1] = True  # keep the row non-empty
    with pytest.raises(ValueError, match="subset-00001.json holds subset row 1 of another design"):
        retrain_subsets(CountingTrain(), other, directory=tmp_path, seed=0)
    with pytest.raises(ValueError, match="another design"):
        retrain_subsets(CountingTrain(), S, directory=tmp_path, seed=1)


def test_same_seed_same_results_and_seed_matters():
    S = _design(5)
    a = retrain_subsets(tiny_train, S, seed=7)
    b = retrain_subsets(tiny_train, S, seed=7)
    np.testing.assert_array_equal(a.losses, b.losses)
    c = retrain_subsets(tiny_train, S, seed=8)
    assert not np.allclose(a.losses, c.losses)
    # vary_seed: row i gets seed + i, so row i equals a same-seed run with seed + i.
    v = retrain_subsets(tiny_train, S, seed=7, vary_seed=True)
    np.testing.assert_array_equal(v.seeds, 7 + np.arange(5))
    row2 = retrain_subsets(tiny_train, S[2:3], seed=9)
    np.testing.assert_array_equal(v.losses[2], row2.losses[0])
    # the caller's global RNG state is left as it was
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    retrain_subsets(tiny_train, S[:2], seed=3)
    torch.testing.assert_close(torch.rand(3), expected)


def test_real_training_reflects_the_data():
    """Ground truth on the tiny problem: the contradicting task 3 hurts, more data helps."""
    S = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    F = retrain_subsets(tiny_train, S, seed=0).column("all")
    assert F[0] < F[1] < F[3]
    assert F[2] < F[1]


def test_parallel_equals_serial(tmp_path):
    S = _design(4)
    serial = retrain_subsets(tiny_train, S, seed=5)
    parallel = retrain_subsets(tiny_train, S, seed=5, n_jobs=2, threads_per_job=1, directory=tmp_path)
    np.testing.assert_array_equal(parallel.losses, serial.losses)
    assert parallel.target_names == serial.target_names
    assert len(os.listdir(tmp_path)) == 4


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_errors(tmp_path):
    S = _design(4)
    bad = S.copy()
    bad[2] = False
    with pytest.raises(ValueError, match="subset row 2 selects no task"):
        retrain_subsets(CountingTrain(), bad)
    with pytest.raises(ValueError, match="2-D"):
        retrain_subsets(CountingTrain(), S[0])
    with pytest.raises(ValueError, match="0/1"):
        retrain_subsets(CountingTrain(), S * 2)
    with pytest.raises(ValueError, match="n_jobs"):
        retrain_subsets(CountingTrain(), S, n_jobs=0)
    with pytest.raises(ValueError, match="task_names has 3 names"):
        retrain_subsets(CountingTrain(), S, task_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="cannot be pickled"):
        retrain_subsets(lambda s, seed: {"all": 1.0}, S, n_jobs=2)
    with pytest.raises(ValueError, match="non-finite loss nan for target 'all'"):
        retrain_subsets(lambda s, seed: {"all": float("nan")}, S)
    with pytest.raises(TypeError, match="non-empty dict"):
        retrain_subsets(lambda s, seed: 1.0, S)

    def inconsistent(subset, seed):
        return {"all": 1.0} if subset[0] else {"total": 1.0}

    mixed = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    with pytest.raises(ValueError, match="row 1"):
        retrain_subsets(inconsistent, mixed)


def test_select_samples():
    ids = np.array([0, 2, 1, 2, 3, 0])
    np.testing.assert_array_equal(select_samples(ids, [1, 0, 1, 0]), [0, 1, 3, 5])
    names = ["x", "y", "z"]
    np.testing.assert_array_equal(select_samples(["z", "x", "y"], [0, 1, 1], task_names=names), [0, 2])
    with pytest.raises(ValueError, match="selects no task"):
        select_samples(ids, [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"task_ids\[4\] = 3"):
        select_samples(ids, [1, 1, 1])


# ---------------------------------------------------------------------------------------------
# Evaluation helpers against hand-computed values
# ---------------------------------------------------------------------------------------------


def _krr_by_hand(Sf, yf, Sh, gamma, alpha):
    def k(A, B):
        d = ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)
        return np.exp(-gamma * d)

    mu = yf.mean()
    theta = np.linalg.solve(k(Sf, Sf) + alpha * np.eye(len(Sf)), yf - mu)
    return mu + k(Sh, Sf) @ theta


def test_compare_with_retraining_matches_hand_computation():
    rng = np.random.default_rng(0)
    K, m = 6, 30
    S = sample_subsets(K, m, p=0.7, seed=3, unique=True).astype(float)
    beta = rng.normal(size=K)
    real = 2.0 + S @ beta + 0.8 * S[:, 0] * S[:, 1] + 0.05 * rng.normal(size=m)
    est = 1.1 * real + 0.1 * rng.normal(size=m)  # a noisy, biased GradEx
    fit, ho = np.arange(22), np.arange(22, m)
    gamma, alpha = 0.3, 0.05
    out = compare_with_retraining(
        S, real, est, n_fit=22,
        surrogates={"kernel": KernelSurrogate(gamma=gamma, alpha=alpha), "linear": LinearSurrogate()},
    )
    assert out["n_fit"] == 22 and out["n_heldout"] == 8 and out["n_targets"] == 1

    def resid(y, p):
        return ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    for source, y_fit in (("gradex", est[fit]), ("real", real[fit])):
        pred_k = _krr_by_hand(S[fit], y_fit, S[ho], gamma, alpha)
        assert out[f"{source}_kernel"]["lds"] == pytest.approx(spearmanr(real[ho], pred_k)[0], abs=1e-12)
        assert out[f"{source}_kernel"]["residual_error"] == pytest.approx(resid(real[ho], pred_k), rel=1e-9)
        X = np.hstack([np.ones((len(fit), 1)), S[fit]])
        coef = np.linalg.lstsq(X, y_fit, rcond=None)[0]
        pred_l = np.hstack([np.ones((len(ho), 1)), S[ho]]) @ coef
        assert out[f"{source}_linear"]["lds"] == pytest.approx(spearmanr(real[ho], pred_l)[0], abs=1e-12)
        assert out[f"{source}_linear"]["residual_error"] == pytest.approx(resid(real[ho], pred_l), rel=1e-9)
        if source == "gradex":  # also scored against GradEx's own held-out values
            assert out["gradex_kernel"]["residual_error_own"] == pytest.approx(resid(est[ho], pred_k), rel=1e-9)
            assert out["gradex_linear"]["lds_own"] == pytest.approx(spearmanr(est[ho], pred_l)[0], abs=1e-12)

    rel = np.abs(est - real) / np.abs(real)
    assert out["gradex"]["relative_error_median"] == pytest.approx(np.median(rel))
    assert out["gradex"]["relative_error_mean"] == pytest.approx(np.mean(rel))
    assert out["gradex"]["lds_heldout"] == pytest.approx(spearmanr(real[ho], est[ho])[0])
    assert out["gradex"]["lds_all"] == pytest.approx(spearmanr(real, est)[0])


def test_compare_exact_cases_and_index_arguments():
    S = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    real = 1.0 + S @ np.array([0.5, 1.0, 2.0])  # exactly linear: [2.5, 3.5, 4, 4.5, 1.5, 2, 3]
    est = np.array([2.4, 3.6, 4.0, 4.4, 1.7, 2.1, 2.8])
    # relative errors by hand: |est - real| / real
    rel = np.abs(est - real) / real
    out = compare_with_retraining(S, real, est, fit=[0, 1, 2, 3], heldout=np.array([4, 5, 6]),
                                  surrogates={"linear": LinearSurrogate()})
    assert out["real_linear"]["lds"] == pytest.approx(1.0)
    assert out["real_linear"]["residual_error"] == pytest.approx(0.0, abs=1e-20)
    assert out["gradex"]["relative_error_median"] == pytest.approx(np.median(rel)) == pytest.approx(0.04)
    assert out["gradex"]["relative_error_mean"] == pytest.approx((0.1 / 2.5 + 0.1 / 3.5 + 0.1 / 4.5 + 0.2 / 1.5
                                                                  + 0.1 / 2 + 0.2 / 3) / 7)
    assert set(out) >= {"gradex_linear", "real_linear", "gradex"}
    mask = np.zeros(7, dtype=bool)
    mask[[4, 5, 6]] = True
    out2 = compare_with_retraining(S, real, est, heldout=mask, surrogates={"linear": LinearSurrogate()})
    assert out2 == out
    # 2-D targets: the mean over columns
    two = compare_with_retraining(S, np.c_[real, -real], np.c_[est, -est], fit=[0, 1, 2, 3],
                                  surrogates={"linear": LinearSurrogate()})
    assert two["gradex"]["lds_heldout"] == pytest.approx(out["gradex"]["lds_heldout"])
    assert two["n_targets"] == 2


def test_heldout_scores_perfect_and_reversed():
    S = sample_subsets(5, 20, p=0.5, seed=1, unique=True).astype(float)
    y = S @ np.arange(1.0, 6.0)
    good = heldout_scores(LinearSurrogate(), S[:12], y[:12], S[12:], y[12:])
    assert good["lds"] == pytest.approx(1.0) and good["residual_error"] == pytest.approx(0.0, abs=1e-20)
    bad = heldout_scores(LinearSurrogate(), S[:12], -y[:12], S[12:], y[12:])
    assert bad["lds"] == pytest.approx(-1.0)
    # predicting -y: residual = sum (2y - 2 mean + 2 mean)^2 / sum (y - mean)^2, by hand
    yh = y[12:]
    assert bad["residual_error"] == pytest.approx(((2 * yh) ** 2).sum() / ((yh - yh.mean()) ** 2).sum())


def test_compare_bad_input():
    S = sample_subsets(4, 10, p=0.6, seed=0, unique=True)
    real = np.linspace(1, 2, 10)
    with pytest.raises(ValueError, match="real has shape"):
        compare_with_retraining(S, real, np.c_[real, real])
    with pytest.raises(ValueError, match=r"estimate must have shape \(10,\)"):
        compare_with_retraining(S, real, real[:9])
    with pytest.raises(ValueError, match="row 3 is both in fit and in heldout"):
        compare_with_retraining(S, real, real, fit=[0, 1, 2, 3], heldout=[3, 4, 5])
    with pytest.raises(ValueError, match="at least 2 held-out"):
        compare_with_retraining(S, real, real, n_fit=9)
    empty = S.copy()
    empty[4] = False
    with pytest.raises(ValueError, match="subset row 4 selects no task"):
        compare_with_retraining(empty, real, real)
    with pytest.raises(ValueError, match="non-finite"):
        compare_with_retraining(S, real, np.r_[real[:9], np.nan])
    with pytest.raises(ValueError, match=r"heldout\[0\] = 12"):
        compare_with_retraining(S, real, real, heldout=[12, 1])


# ---------------------------------------------------------------------------------------------
# Lightning adapter
# ---------------------------------------------------------------------------------------------


def _lit_module(seed):
    import lightning.pytorch as L

    class Reg(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((x @ self.w - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Reg()


def _lit_trainer(seed, root):
    import lightning.pytorch as L

    return L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", default_root_dir=root)


def _lit_loader(subset, seed):
    X, y, tasks, _, _ = _tiny_data()
    idx = select_samples(tasks.numpy(), subset)
    ds = torch.utils.data.TensorDataset(X[idx], y[idx])
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _lit_eval(module):
    _, _, _, Xt, yt = _tiny_data()
    with torch.no_grad():
        return {"all": float(((Xt @ module.w - yt) ** 2).mean())}


def test_lightning_train_fn(tmp_path):
    import functools
    import warnings

    fn = LightningTrainFn(_lit_module, functools.partial(_lit_trainer, root=str(tmp_path)), _lit_loader, _lit_eval)
    S = np.array([[1, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = retrain_subsets(fn, S, seed=0, directory=tmp_path / "runs")
        b = retrain_subsets(fn, S, seed=0)  # retrained from scratch: the same numbers
    np.testing.assert_array_equal(a.losses, b.losses)
    F = a.column("all")
    untrained = _lit_eval(_lit_module(0))["all"]
    assert F[0] < F[2] < untrained < F[1]  # task 3 contradicts the target: training on it alone hurts
