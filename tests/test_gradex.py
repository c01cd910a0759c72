"""GradEx solver against independent ground truth: per-subset scipy / closed-form solves,
sklearn logistic regression, hand-computed weightings, direct target evaluation, and input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, logsumexp, softmax

from lightning_ksm.features import HarvestedFeatures

from conftest import GRADEX_LOSS_MODES as MODES
from conftest import GRADEX_TASK_SIZES as TASK_SIZES
from conftest import gradex_features as make_split
from lightning_ksm.estimation import (
    GradExConvergenceWarning,
    default_loss,
    gradex,
    solve_subsets,
    subset_sample_weights,
)

K = 5


def ref_weights(S_row, tid, weighting):
    """Per-sample weights written straight from the formula (independent of the package)."""
    sel = S_row[tid].astype(float)
    if weighting == "task":
        n_t = np.bincount(tid)
        return sel / (S_row.sum() * n_t[tid])
    return sel / sel.sum()


def ref_objective(feats, loss, w, lam):
    """Objective value and gradient in numpy, for scipy."""
    f0, J, y = feats.outputs, feats.jacobians, feats.labels

    def fun(z):
        if J.ndim == 3:
            P = f0 + np.einsum("nck,k->nc", J, z)
        else:
            P = f0 + J @ z
        if loss == "cross_entropy":
            li = logsumexp(P, axis=1) - P[np.arange(len(y)), y]
            G = softmax(P, axis=1)
            G[np.arange(len(y)), y] -= 1
        elif loss == "logistic":
            li = np.logaddexp(0, P) - y * P
            G = expit(P) - y
        else:
            R = P - y
            li = 0.5 * (R**2 if R.ndim == 1 else (R**2).sum(1))
            G = R
        grad = (np.einsum("nck,nc->k", J, G * w[:, None]) if J.ndim == 3 else J.T @ (w * G)) + lam * z
        return float(w @ li + 0.5 * lam * z @ z), grad

    return fun


def ref_solve(feats, loss, w, lam):
    k = feats.proj_dim
    if loss == "squared":  # closed form
        J = feats.jacobians.reshape(feats.n_samples, -1, k)
        r = (np.asarray(feats.labels) - feats.outputs).reshape(feats.n_samples, -1)
        H = np.einsum("n,nck,ncl->kl", w, J, J) + lam * np.eye(k)
        return np.linalg.solve(H, np.einsum("n,nck,nc->k", w, J, r))
    res = minimize(
        ref_objective(feats, loss, w, lam), np.zeros(k), jac=True, method="L-BFGS-B",
        options=dict(gtol=1e-13, ftol=1e-16, maxiter=20000, maxcor=30),
    )
    return res.x


SUBSETS = np.array(
    [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
    ],
    dtype=bool,
)


CASES = [("cross_entropy", False), ("logistic", False), ("squared", False), ("squared", True)]


@pytest.mark.parametrize("loss,vector", CASES)
@pytest.mark.parametrize("weighting", ["task", "sample"])
def test_matches_independent_per_subset_solve(loss, vector, weighting):
    feats = make_split(loss, seed=1, vector_regression=vector)
    lam = 0.05
    sol = solve_subsets(feats, SUBSETS, lam=lam, weighting=weighting, dtype=torch.float64)
    assert sol.solutions.shape == (len(SUBSETS), feats.proj_dim)
    assert sol.converged.all()
    tid = np.asarray(feats.task_ids)
    for j, row in enumerate(SUBSETS):
        w = ref_weights(row, tid, weighting)
        z_ref = ref_solve(feats, loss, w, lam)
        z = sol.solutions[j]
        assert np.linalg.norm(z - z_ref) <= 1e-5 * np.linalg.norm(z_ref), (j, z, z_ref)
        # first-order optimality of the returned point, checked with the reference gradient
        _, grad = ref_objective(feats, loss, w, lam)(z)
        _, grad0 = ref_objective(feats, loss, w, lam)(np.zeros_like(z))
        assert np.linalg.norm(grad) <= 1e-7 * np.linalg.norm(grad0)
    if loss == "squared":  # the Hessian is constant: one Newton step is the closed form
        assert (sol.n_iter == 1).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
def test_diagonal_preconditioner_reaches_the_same_solution(loss):
    feats = make_split(loss, seed=24)
    sol = solve_subsets(feats, SUBSETS[:3], lam=0.05, preconditioner="diagonal", dtype=torch.float64)
    assert sol.converged.all()
    for j, row in enumerate(SUBSETS[:3]):
        z_ref = ref_solve(feats, loss, ref_weights(row, np.asarray(feats.task_ids), "task"), 0.05)
        assert np.linalg.norm(sol.solutions[j] - z_ref) <= 1e-5 * np.linalg.norm(z_ref)
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        solve_subsets(feats, SUBSETS, preconditioner="ilu")


def test_batching_and_permutation_invariance():
    feats = make_split("cross_entropy", seed=2)
    full = gradex(feats, feats, SUBSETS, lam=0.02, keep_solutions=True, dtype=torch.float64)
    one = gradex(feats, feats, SUBSETS, lam=0.02, batch_size=1, keep_solutions=True, dtype=torch.float64)
    np.testing.assert_allclose(one.solutions, full.solutions, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(one.losses, full.losses, rtol=1e-9)
    perm = np.random.default_rng(0).permutation(len(SUBSETS))
    permuted = gradex(feats, feats, SUBSETS[perm], lam=0.02, batch_size=3, keep_solutions=True, dtype=torch.float64)
    np.testing.assert_allclose(permuted.losses, full.losses[perm], rtol=1e-9)
    np.testing.assert_allclose(permuted.solutions, full.solutions[perm], rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(permuted.subsets, SUBSETS[perm])


def test_task_vs_sample_weighting_follow_the_formula():
    # One feature, squared loss: z = sum_i w_i J_i r_i / (sum_i w_i J_i^2 + lam) by hand.
    tid = np.array([0] * 2 + [1] * 6)  # task 0 has 2 samples, task 1 has 6
    J = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    y = np.array([3.0, 3.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    feats = HarvestedFeatures(np.zeros(8), J, y, tid, ["a", "b"], "regression")
    lam = 0.5
    both = np.array([[1, 1]], dtype=bool)
    # task weighting: each task's mean, then the mean over the 2 tasks
    w_task = np.where(tid == 0, 0.5 / 2, 0.5 / 6)
    # sample weighting: every sample 1/8
    w_sample = np.full(8, 1 / 8)
    for weighting, w in [("task", w_task), ("sample", w_sample)]:
        z_hand = (w * J[:, 0] * y).sum() / ((w * J[:, 0] ** 2).sum() + lam)
        z = solve_subsets(feats, both, lam=lam, weighting=weighting, dtype=torch.float64).solutions[0, 0]
        assert z == pytest.approx(z_hand, rel=1e-12)
    # by hand: task weighting gives (0.25*3+0.5*3 - 0.5)/(0.25+1+0.5+0.5) = 1.75/2.25
    z_task = solve_subsets(feats, both, lam=lam, weighting="task", dtype=torch.float64).solutions[0, 0]
    assert z_task == pytest.approx(1.75 / 2.25, rel=1e-12)
    z_sample = solve_subsets(feats, both, lam=lam, weighting="sample", dtype=torch.float64).solutions[0, 0]
    assert z_sample == pytest.approx((9 / 8 - 6 / 8) / (11 / 8 + 0.5), rel=1e-12)
    # the two weightings coincide on single-task subsets and on balanced tasks
    single = np.array([[0, 1]], dtype=bool)
    np.testing.assert_allclose(
        solve_subsets(feats, single, lam=lam, weighting="task", dtype=torch.float64).solutions,
        solve_subsets(feats, single, lam=lam, weighting="sample", dtype=torch.float64).solutions,
        rtol=1e-12,
    )
    balanced = make_split("logistic", seed=3, sizes=[20] * K)
    np.testing.assert_allclose(
        solve_subsets(balanced, SUBSETS, lam=0.1, weighting="task", dtype=torch.float64).solutions,
        solve_subsets(balanced, SUBSETS, lam=0.1, weighting="sample", dtype=torch.float64).solutions,
        rtol=1e-9, atol=1e-12,
    )


def test_subset_sample_weights_rows_sum_to_one():
    counts = np.array(TASK_SIZES)
    for weighting in ("task", "sample"):
        A = subset_sample_weights(SUBSETS, counts, weighting)
        np.testing.assert_allclose((A * counts).sum(1), 1.0, rtol=1e-12)
        assert (A[~SUBSETS] == 0).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "logistic", "squared"])
def test_target_losses_equal_direct_evaluation(loss):
    source = make_split(loss, seed=4)
    target = make_split(loss, seed=5, sizes=[0, 7, 0, 13, 9])  # tasks 0 and 2 absent from target

    def metric(outputs, labels):
        return float(np.mean(np.abs(outputs)) + 0.1 * np.mean(labels))

    res = gradex(source, target, SUBSETS, lam=0.03, keep_solutions=True, metric=metric)
    assert res.target_names == ["task1", "task3", "task4", "all"]
    assert res.losses.shape == (len(SUBSETS), 4)
    tid, y = np.asarray(target.task_ids), np.asarray(target.labels)
    groups = [tid == 1, tid == 3, tid == 4, np.ones(len(tid), bool)]
    for j, z in enumerate(res.solutions):
        if target.jacobians.ndim == 3:
            P = target.outputs + np.einsum("nck,k->nc", target.jacobians, z)
        else:
            P = target.outputs + target.jacobians @ z
        if loss == "cross_entropy":
            li = logsumexp(P, axis=1) - P[np.arange(len(y)), y]
            correct = P.argmax(1) == y
        elif loss == "logistic":
            li = np.logaddexp(0, P) - y * P
            correct = (P > 0) == (y > 0.5)
        else:
            li = 0.5 * (P - y) ** 2
            correct = None
        for g, mask in enumerate(groups):
            assert res.losses[j, g] == pytest.approx(li[mask].mean(), rel=1e-10)
            assert res.metric_values[j, g] == pytest.approx(metric(P[mask], y[mask]), rel=1e-10)
            if correct is not None:
                assert res.accuracy[j, g] == pytest.approx(correct[mask].mean(), abs=1e-12)
    if loss == "squared":
        assert res.accuracy is None
    np.testing.assert_allclose(res.solution_norms, np.linalg.norm(res.solutions, axis=1), rtol=1e-10)
    np.testing.assert_array_equal(res.column("all"), res.losses[:, -1])


def test_margin_mode_is_logistic_with_label_one():
    feats = make_split("logistic", seed=6)
    margin = HarvestedFeatures(
        feats.outputs, feats.jacobians, np.ones(feats.n_samples), feats.task_ids,
        feats.task_names, "margin",
    )
    assert default_loss("margin") == "logistic"
    res = gradex(margin, margin, SUBSETS, lam=0.2, keep_solutions=True, dtype=torch.float64)
    assert res.loss == "logistic"
    for j, z in enumerate(res.solutions):
        P = margin.outputs + margin.jacobians @ z
        assert res.losses[j, -1] == pytest.approx(np.logaddexp(0, -P).mean(), rel=1e-10)
        # the optimum of softplus(-(f0 + J z)) + lam/2 |z|^2 with task weighting
        w = ref_weights(SUBSETS[j], np.asarray(margin.task_ids), "task")
        grad = -margin.jacobians.T @ (w * expit(-P)) + 0.2 * z
        assert np.linalg.norm(grad) < 1e-8


def test_agrees_with_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    feats = make_split("logistic", seed=7)
    feats = HarvestedFeatures(
        np.zeros(feats.n_samples), feats.jacobians, feats.labels, feats.task_ids,
        feats.task_names, "logistic",
    )
    lam = 0.05
    sol = solve_subsets(feats, SUBSETS, lam=lam, dtype=torch.float64)
    tid = np.asarray(feats.task_ids)
    for j, row in enumerate(SUBSETS):
        w = ref_weights(row, tid, "task")
        sel = w > 0
        # sklearn minimizes C * sum_i sw_i loss_i + |w|^2 / 2: with sw = w (sums to 1), C = 1/lam
        clf = LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-10, max_iter=10000)
        clf.fit(feats.jacobians[sel], feats.labels[sel], sample_weight=w[sel])
        np.testing.assert_allclose(sol.solutions[j], clf.coef_[0], rtol=1e-5, atol=1e-6)


def test_agrees_with_sklearn_multinomial_regression():
    from sklearn.linear_model import LogisticRegression

    # Multinomial regression logits = W x is cross-entropy GradEx with z = vec(W) and
    # J_i = kron(I_C, x_i^T) and zero offsets.
    rng = np.random.default_rng(8)
    C, d, n = 3, 4, 90
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=(d, C)) + rng.normal(size=(n, C))).argmax(1)
    tid = np.arange(n) % 3
    J = np.einsum("ab,nd->nabd", np.eye(C), X).reshape(n, C, C * d)
    feats = HarvestedFeatures(np.zeros((n, C)), J, y, tid, ["a", "b", "c"], "logits")
    S = np.array([[1, 1, 1], [1, 0, 1]], dtype=bool)
    lam = 0.1
    sol = solve_subsets(feats, S, lam=lam, weighting="sample", dtype=torch.float64)
    for j, row in enumerate(S):
        sel = row[tid]
        clf = LogisticRegression(C=1 / (lam * sel.sum()), fit_intercept=False, tol=1e-10, max_iter=10000)
        clf.fit(X[sel], y[sel])
        np.testing.assert_allclose(sol.solutions[j], clf.coef_.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "logistic", "squared"])
def test_default_auto_precision_close_to_float64(loss):
    # dtype="auto" (the default) solves in float32 to a 1e-5 relative gradient tolerance
    feats = make_split(loss, seed=9)
    r64 = gradex(feats, feats, SUBSETS, lam=0.05, dtype=torch.float64, keep_solutions=True)
    for dtype in ("auto", torch.float32):
        r = gradex(feats, feats, SUBSETS, lam=0.05, dtype=dtype, keep_solutions=True)
        assert r.converged.all()
        np.testing.assert_allclose(r.losses, r64.losses, rtol=1e-5)
        err = np.linalg.norm(r.solutions - r64.solutions, axis=1) / np.linalg.norm(r64.solutions, axis=1)
        assert err.max() < 2e-5


def test_auto_resolves_in_float64_what_float32_cannot():
    # A tolerance below float32 round-off: float32 alone stalls and says so; "auto" finishes
    # those subsets in float64 and lands on the float64 solution.
    feats = make_split("cross_entropy", seed=25)
    with pytest.warns(GradExConvergenceWarning):
        r32 = gradex(feats, feats, SUBSETS, lam=0.05, tol=1e-9, dtype=torch.float32)
    assert not r32.converged.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradExConvergenceWarning)
        auto = gradex(feats, feats, SUBSETS, lam=0.05, tol=1e-9, keep_solutions=True)
    assert auto.converged.all() and auto.extras["float64_resolved"] == len(SUBSETS)
    r64 = gradex(feats, feats, SUBSETS, lam=0.05, tol=1e-9, dtype=torch.float64, keep_solutions=True)
    np.testing.assert_allclose(auto.solutions, r64.solutions, rtol=1e-7, atol=1e-10)


def test_unconverged_subsets_are_reported():
    feats = make_split("logistic", seed=10)
    for dtype in (torch.float64, "auto"):
        with pytest.warns(GradExConvergenceWarning, match="did not reach"):
            sol = solve_subsets(feats, SUBSETS, lam=1e-3, max_iter=1, dtype=dtype)
        assert not sol.converged.any()
        # "auto" spends its max_iter steps in float32, then again in float64
        assert (sol.n_iter == (1 if dtype == torch.float64 else 2)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradExConvergenceWarning)
        assert solve_subsets(feats, SUBSETS, lam=1e-3).converged.all()


def test_empty_target_or_source_task_rows_in_subset_weights():
    # a task with no source samples is fine as long as no subset selects it
    feats = make_split("logistic", seed=11, sizes=[10, 0, 12])
    ok = solve_subsets(feats, np.array([[1, 0, 1]]), lam=0.1)
    assert ok.converged.all()


# ----------------------------------------------------------------------------- input errors


def _replace(feats, **kw):
    args = dict(
        outputs=feats.outputs, jacobians=feats.jacobians, labels=feats.labels,
        task_ids=feats.task_ids, task_names=feats.task_names, mode=feats.mode,
    )
    args.update(kw)
    return HarvestedFeatures(**args)


def test_error_empty_subset_row():
    feats = make_split("logistic", seed=12)
    S = SUBSETS.copy()
    S[3] = False
    with pytest.raises(ValueError, match="subset row 3 selects no task"):
        gradex(feats, feats, S)


def test_error_task_without_source_samples_is_named():
    feats = make_split("logistic", seed=13, sizes=[10, 0, 12])
    with pytest.raises(ValueError, match="'task1'.*no samples.*row 1"):
        solve_subsets(feats, np.array([[1, 0, 1], [0, 1, 1]]))


def test_error_subset_columns_do_not_match_tasks():
    feats = make_split("logistic", seed=14)
    with pytest.raises(ValueError, match="4 columns but the source split has K = 5"):
        gradex(feats, feats, SUBSETS[:, :4])


def test_error_non_binary_subsets():
    feats = make_split("logistic", seed=15)
    with pytest.raises(ValueError, match="0/1"):
        solve_subsets(feats, SUBSETS.astype(float) * 0.5 + 0.5)


@pytest.mark.parametrize("field", ["outputs", "jacobians"])
@pytest.mark.parametrize("split", ["source", "target"])
def test_error_non_finite_values_name_split_and_index(field, split):
    feats = make_split("cross_entropy", seed=16)
    bad = np.array(getattr(feats, field), dtype=float)
    bad[17] = np.nan if field == "outputs" else np.inf
    broken = _replace(feats, **{field: bad})
    src, tgt = (broken, feats) if split == "source" else (feats, broken)
    with pytest.raises(ValueError, match=rf"{split}\.{field} has a NaN or inf value at sample index 17"):
        gradex(src, tgt, SUBSETS)


def test_error_labels_out_of_range_for_cross_entropy():
    feats = make_split("cross_entropy", seed=17)
    labels = np.array(feats.labels)
    labels[5] = 3  # C = 3 logits
    with pytest.raises(ValueError, match=r"source\.labels\[5\] = 3 is not a class index in \[0, 3\)"):
        solve_subsets(_replace(feats, labels=labels), SUBSETS)
    labels[5] = -1
    with pytest.raises(ValueError, match=r"target\.labels\[5\]"):
        gradex(feats, _replace(feats, labels=labels), SUBSETS)


def test_error_logistic_labels_not_binary():
    feats = make_split("logistic", seed=18)
    labels = np.array(feats.labels)
    labels[2] = 0.5
    with pytest.raises(ValueError, match=r"labels\[2\] = 0.5"):
        solve_subsets(_replace(feats, labels=labels), SUBSETS)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_error_bad_lambda(lam):
    feats = make_split("logistic", seed=19)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        gradex(feats, feats, SUBSETS, lam=lam)


def test_error_source_target_projection_dims_differ():
    source = make_split("logistic", seed=20, k=8)
    target = make_split("logistic", seed=21, k=6)
    with pytest.raises(ValueError, match=r"different projection dims k \(8 vs 6\)"):
        gradex(source, target, SUBSETS)


def test_error_mismatched_shapes_and_modes():
    ce = make_split("cross_entropy", seed=22)
    logi = make_split("logistic", seed=23)
    with pytest.raises(ValueError, match="per-sample shape"):
        gradex(ce, logi, SUBSETS)
    with pytest.raises(ValueError, match="loss='logistic' needs a scalar output"):
        solve_subsets(ce, SUBSETS, loss="logistic")
    with pytest.raises(ValueError, match="loss='cross_entropy' needs"):
        solve_subsets(logi, SUBSETS, loss="cross_entropy")
    with pytest.raises(ValueError, match="loss must be one of"):
        solve_subsets(logi, SUBSETS, loss="hinge")
    with pytest.raises(ValueError, match="weighting must be one of"):
        solve_subsets(logi, SUBSETS, weighting="uniform")
    with pytest.raises(ValueError, match="pass loss="):
        solve_subsets(_replace(logi, mode="custom"), SUBSETS)
    with pytest.raises(ValueError, match="imply different losses"):
        reg = _replace(logi, mode="regression", labels=np.asarray(logi.labels) * 2.0)
        gradex(logi, reg, SUBSETS)
    with pytest.raises(ValueError, match=r"target\.task_ids\[0\] = 9"):
        gradex(logi, _replace(logi, task_ids=np.full(logi.n_samples, 9)), SUBSETS)
    with pytest.raises(TypeError, match="target must be a HarvestedFeatures"):
        gradex(logi, {"outputs": 1}, SUBSETS)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        gradex(logi, logi, SUBSETS, batch_size=0)
    with pytest.raises(TypeError, match="metric must be a callable"):
        gradex(logi, logi, SUBSETS, metric="accuracy")


def test_read_only_memory_mapped_features(tmp_path):
    # the feature store hands GradEx read-only memory maps: same answer as in-memory arrays
    feats = make_split("logistic", seed=26)
    path = tmp_path / "J.npy"
    np.save(path, feats.jacobians.astype(np.float32))
    mapped = _replace(feats, jacobians=np.load(path, mmap_mode="r"))
    in_memory = _replace(feats, jacobians=feats.jacobians.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = gradex(mapped, mapped, SUBSETS, lam=0.05)
    b = gradex(in_memory, in_memory, SUBSETS, lam=0.05)
    np.testing.assert_array_equal(a.losses, b.losses)
