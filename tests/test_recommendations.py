"""Readouts a user acts on: support-aware best subsets, bootstrap intervals (their coverage on a
planted problem), co-training groups by predicted group outcomes, interaction wording by case."""

import numpy as np
import pytest

from lightning_ksm import KernelSurrogate, LinearSurrogate, analyze, sample_subsets
from lightning_ksm.readouts import (
    Support,
    bootstrap_interval,
    best_subset,
    bootstrap_readouts,
    cotraining_groups,
    ensemble_design,
    interaction_case,
    select_groups,
)
from lightning_ksm.readouts.scores import _ensemble_from


def _dense(K=10, m=60, seed=0):
    """Subsets of 8-10 of 10 tasks whose loss falls as tasks are removed: a linear fit extrapolates
    to a negative loss for small subsets."""
    rng = np.random.default_rng(seed)
    S = np.ones((m, K), dtype=bool)
    for r in range(m):
        S[r, rng.choice(K, size=int(rng.integers(0, 3)), replace=False)] = False
    F = 0.1 + 0.15 * (S.sum(axis=1) - 8) + 0.01 * rng.normal(size=m)
    return S, F


def test_best_subset_stays_inside_the_support_and_never_shows_an_impossible_loss():
    S, F = _dense()
    lin = LinearSurrogate().fit(S, F)
    free = best_subset(lin, support="none")
    assert free.predicted_loss < 0 and len(free.tasks) == 1  # what the old search recommended
    b = best_subset(lin, lower_bound=0.0)
    assert 8 <= len(b.tasks) <= 10 and b.predicted_loss >= 0
    assert Support(S).contains(b.mask[None])[0]
    assert b.outside is not None and b.outside[1] < 0  # the report can say the search wanted out
    assert all(v >= 0 for _, v in b.candidates)
    heuristic = best_subset(lin, lower_bound=0.0, max_exact=10)  # local search: same guarantees
    assert not heuristic.exact and 8 <= len(heuristic.tasks) and heuristic.predicted_loss >= 0


def test_the_report_says_when_the_search_left_the_support():
    S, F = _dense()
    rep = analyze(subsets=S, losses=F[:, None], task_names=[f"t{k}" for k in range(10)], target_names=["all"],
                  config={"n_bootstrap": 20, "ensemble_samples": 500})
    e = rep.best_subsets[0]
    assert e["predicted_loss"] >= 0 and e["size"] >= 8
    assert e["left_support"]["predicted_loss"] is None  # an impossible loss is never shown
    assert e["left_support"]["outside_evidence"] is True
    assert "outside the surrogate's evidence" in rep.to_text() and "outside the surrogate" in rep.to_html()
    assert "at a loss below the lowest possible" in rep.to_text()  # both reasons are said
    assert e["predicted_interval"][0] <= e["predicted_loss"] <= e["predicted_interval"][1]


def test_a_better_looking_subset_at_an_impossible_loss_inside_the_evidence_is_named_as_such():
    from lightning_ksm.report.text import left_support_reason

    inside = {"size": 3, "distance": 0, "outside_evidence": False, "predicted_loss": None}
    assert left_support_reason(inside) == "at a loss below the lowest possible"  # not "outside the evidence"
    outside = {"size": 3, "distance": 2, "outside_evidence": True, "predicted_loss": 0.1}
    assert left_support_reason(outside) == "outside the surrogate's evidence (distance 2 from the fitted subsets)"
    assert left_support_reason({"size": 3, "distance": 0, "predicted_loss": None}) == \
        "at a loss below the lowest possible"  # a report saved before the field existed
    missed = {"size": 3, "distance": 0, "outside_evidence": False, "predicted_loss": 0.2}  # the local search
    assert left_support_reason(missed) == "that the search inside the evidence did not reach"


def _truth(S):
    S = S.astype(float)
    w = np.array([0.3, -0.2, 0.1, 0.0, 0.25, -0.05])
    return 1.0 - S @ w - 0.3 * S[:, 2] * S[:, 3] + 0.2 * S[:, 0] * S[:, 4]


def test_bootstrap_intervals_cover_the_planted_scores():
    K, hits, n = 6, 0, 0
    for rep in range(10):
        S = sample_subsets(K, 60, p=0.7, seed=rep)
        F = (_truth(S) + 0.05 * np.random.default_rng(100 + rep).normal(size=len(S)))[:, None]
        ker = KernelSurrogate().fit(S, F)
        E = ensemble_design(ker, n_samples=1000, seed=0)
        truth = _ensemble_from(E, _truth(E)[:, None])[:, 0]
        est = _ensemble_from(E, ker.predict(E).reshape(-1, 1))[:, 0]
        draws = bootstrap_readouts(ker, S, F, n_boot=60, ensemble_subsets=E, seed=rep, readouts=("ensemble",))
        lo, hi = bootstrap_interval(draws.ensemble[:, :, 0], est, 0.9)
        hits += int(np.sum((lo <= truth) & (truth <= hi)))
        n += K
    assert hits / n >= 0.75, hits / n  # nominal 0.9; measured 0.85 over 16 data sets


def test_the_bootstrap_slices_one_kernel_and_draws_what_refitting_each_replicate_draws():
    class Refits:  # the surrogate without its shortcut: refitted per replicate with gamma, alpha fixed
        def __init__(self, gamma, alpha):
            self.gamma, self.alpha = gamma, alpha

        def get_params(self, deep=False):
            return {"gamma": self.gamma, "alpha": self.alpha}

        def fit(self, S, F):
            self.fitted = KernelSurrogate(gamma=self.gamma, alpha=self.alpha).fit(S, F)
            return self

        def predict(self, S):
            return self.fitted.predict(S)

    K = 6
    S = sample_subsets(K, 50, p=0.7, seed=3)
    F = np.stack([_truth(S), 2 * _truth(S) ** 2], axis=1)
    ker = KernelSurrogate().fit(S, F)
    E = ensemble_design(ker, n_samples=300, seed=0)
    kw = dict(n_boot=15, ensemble_subsets=E, queries=S[:4], interaction_columns=[1], seed=2)
    fast, slow = bootstrap_readouts(ker, S, F, **kw), bootstrap_readouts(Refits(ker.gamma_, ker.alpha_), S, F, **kw)
    for name in ("ensemble", "loo", "interactions", "queries"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-6, atol=1e-6, err_msg=name)


def test_intervals_reach_every_output(tmp_path):
    K = 6
    names = [f"t{k}" for k in range(K)]
    S = sample_subsets(K, 50, p=0.7, seed=1)
    F = np.stack([_truth(S) + 0.02 * k for k in range(K)], axis=1)
    rep = analyze(subsets=S, losses=F, task_names=names, target_names=names,
                  config={"n_bootstrap": 30, "ensemble_samples": 500})
    iv = rep.score_interval()
    assert iv.shape == (2, K, K) and (iv[0] <= iv[1]).all()
    assert rep.interaction_interval("t0").shape == (2, K, K)
    assert all("predicted_interval" in e for e in rep.best_subsets + rep.groups)
    rep.save(tmp_path, figures=False)
    csv = (tmp_path / "intervals.csv").read_text()
    assert csv.startswith("kind,target,task_i,task_j,method,estimate,lo,hi")
    assert {"score", "interaction", "best_subset", "group"} <= {ln.split(",")[0] for ln in csv.splitlines()[1:]}
    assert "[lo, hi]" in rep.to_text() and 'class="iv"' in rep.to_html()
    assert type(rep).load(tmp_path) == rep


def test_groups_follow_predicted_group_losses_and_keep_a_synergistic_pair_together():
    # tasks 0 and 1 help each other only together; 2 and 3 help each other; 4 hurts everyone.
    K = 5
    S = sample_subsets(K, 31, p=0.5, seed=0, unique=True)

    def F(S):
        S = S.astype(float)
        pair = 1.0 - 0.6 * S[:, 0] * S[:, 1]
        other = 1.0 - 0.3 * S[:, 2] - 0.3 * S[:, 3]
        harm = 0.4 * S[:, 4]
        return np.stack([pair + harm, pair + harm, other + harm, other + harm, 1.0 - 0.2 * S[:, 4]], axis=1)

    sur = KernelSurrogate().fit(S, F(S))
    groups = cotraining_groups(sur, 3, target_columns=np.arange(K), support="none")
    together = [set(g.tasks) for g in groups]
    assert any({0, 1} <= g for g in together) and any({2, 3} <= g for g in together)
    assert not any(4 in g and (g & {0, 1, 2, 3}) for g in together)
    # exhaustive and local search agree on this small problem
    loss = lambda m: sur.predict(m.astype(float))  # noqa: E731
    exact = select_groups(loss, K, 3)
    local = select_groups(loss, K, 3, max_exact=1)
    assert exact.exact and not local.exact and local.value <= exact.value + 1e-9


@pytest.mark.parametrize("si, sj, v, label", [
    (1, 1, -1, "synergy"), (1, 1, 1, "redundancy"), (-1, -1, 1, "compounding harm"),
    (-1, -1, -1, "redundant harm"), (1, -1, -1, "masking"), (-1, 1, 1, "masking"), (1, 1, 0, "none")])
def test_interaction_wording_follows_the_case(si, sj, v, label):
    assert interaction_case(si, sj, v)[0] == label


@pytest.mark.parametrize("budget, all_rescored", [(0.5, False), (10.0, True)])
def test_best_subset_re_scoring_stays_within_its_budget_and_takes_the_targets_of_interest_first(budget, all_rescored):
    """With every source task also a target, re-scoring every target's candidates is 1 + top x (K + 1)
    GradEx subsets: 646 at K = 128, three times the main run. It is capped at rescore_budget x n_subsets,
    the pooled target first; the targets left out keep the surrogate's pick, and the report says so."""
    from lightning_ksm.analysis import report_from_losses

    K, m = 12, 40
    rng = np.random.default_rng(0)
    W = rng.normal(size=(K, K + 1))
    S = sample_subsets(K, m, p=0.5, seed=0)
    F = 1.0 - S.astype(float) @ W / K
    names = [f"t{k}" for k in range(K)]
    calls = []

    def rescore(masks):
        calls.append(len(masks))
        return 1.0 - masks.astype(float) @ W / K

    report = report_from_losses(S, F, names, names + ["all"], {"rescore_budget": budget, "n_bootstrap": 0,
                                                               "n_subsets": m}, rescore=rescore)
    assert len(calls) == 1
    rescored = {b["target"] for b in report.best_subsets if "gradex_loss" in b}
    assert "all" in rescored
    if all_rescored:
        assert rescored == set(names + ["all"])
        assert not any("not re-scored" in n for n in report.fit_quality.get("notes", []))
    else:
        assert calls[0] <= budget * m and len(rescored) < K + 1
        assert any("rescore_budget" in n for n in report.fit_quality.get("notes", []))
