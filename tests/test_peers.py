"""Smoke test of benchmarks/peers.py (issue 13): the harness on a tiny really-retrained problem with
dattri methods; skipped when the ``bench`` extra (dattri) is not installed."""

import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_aggregation_sums_and_means_per_task():
    from _peers_dattri import aggregate, sample_positions

    task = np.array([0, 0, 0, 1, 1, 2])
    pos, scale = sample_positions(task, 3, 2, seed=0)
    assert np.bincount(task[pos], minlength=3).tolist() == [2, 2, 1]
    assert scale.tolist() == [1.5, 1.0, 1.0]
    A = np.arange(len(pos) * 2, dtype=float).reshape(len(pos), 2)  # rows: attributed samples, cols: targets
    out = aggregate(A, task[pos], 3, scale)
    per = A.mean(1)
    rows = task[pos]
    assert np.allclose(out["sum"], [per[rows == 0].sum() * 1.5, per[rows == 1].sum(), per[rows == 2].sum()])
    assert np.allclose(out["mean"], [per[rows == k].mean() for k in range(3)])


def test_harness_on_a_tiny_problem(tmp_path):
    pytest.importorskip("dattri", reason="the peers need the bench extra: pip install -e '.[bench]'")
    import torch

    torch.set_num_threads(1)
    from _peers_problems import tiny_problem
    from peers import format_tables, run_problem

    p = tiny_problem()
    budget = dict(n_per_task=None, n_targets=None, n_hessian=64, only=["grad_dot", "trak_p32", "if_explicit_d0.01"])
    kf = {"strategies": ("ekfac",), "dampings": (None,)}  # (only when kronfluence is installed)
    res = run_problem(p, budget, str(tmp_path), log=lambda *_: None, kronfluence=kf)
    rows = res["rows"]
    for name in ("minus_size", "noise_ceiling", "linear_datamodel", "loo_retraining", "tag_lookahead",
                 "grad_cos_affinity_final", "grad_dot", "grad_dot_mean", "trak_p32", "if_explicit_d0.01"):
        assert name in rows, name
    for name in ("grad_dot", "trak_p32", "if_explicit_d0.01", "tag_lookahead", "linear_datamodel"):
        assert "error" not in rows[name], rows[name].get("error")
        assert -1.0 <= rows[name]["lds"] <= 1.0
        assert -1.0 <= rows[name]["loo_spearman"] <= 1.0
    # the planted harmful task 0 (flipped labels) gets the lowest score from the gradient methods
    assert int(np.argmin(rows["grad_dot"]["task_scores"])) == 0
    assert rows["tag_lookahead"]["replay"]["replay_max_abs_diff_vs_recorded_final"] == 0.0
    assert "| grad_dot |" in format_tables({"problems": {"tiny": res}})
    # cached: a second call re-scores without recomputing the dattri rows
    again = run_problem(p, budget, str(tmp_path), log=lambda *_: None, kronfluence=kf)
    assert again["rows"]["grad_dot"]["lds"] == rows["grad_dot"]["lds"]


def test_kronfluence_rows_on_a_tiny_problem(tmp_path):
    pytest.importorskip("kronfluence", reason="Kronfluence's rows need it: pip install -e '.[bench]'")
    import torch

    torch.set_num_threads(1)
    from _peers_kronfluence import run_kronfluence
    from _peers_problems import tiny_problem
    from peers import Cache, score_tasks

    p = tiny_problem()
    cache = Cache(str(tmp_path / "kronfluence.json"))
    res = run_kronfluence(p, n_hessian=64, strategies=("ekfac",), dampings=(None, 1e-3), cache=cache,
                          workdir=str(tmp_path / "work"), log=lambda *_: None)
    assert set(res) == {"kf_ekfac_dheur", "kf_ekfac_d0.001"}
    for r in res.values():
        assert r["info"]["error"] is None, r["info"]["error"]
        sc = score_tasks(p, r["scores"]["sum"])
        assert -1.0 <= sc["lds"] <= 1.0 and -1.0 <= sc["loo_spearman"] <= 1.0
        # the planted harmful task 0 (flipped labels) gets the lowest score, as with the dattri rows
        assert int(np.argmin(r["scores"]["sum"])) == 0
    # cached: a second call returns the same rows without recomputing
    again = run_kronfluence(p, n_hessian=64, strategies=("ekfac",), dampings=(None, 1e-3), cache=cache,
                            workdir=str(tmp_path / "work"), log=lambda *_: None)
    assert again["kf_ekfac_dheur"]["scores"] == res["kf_ekfac_dheur"]["scores"]
