"""The recipes' quick modes, end to end, and checks that their numbers are computed correctly."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import spearmanr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from recipes import _planted  # noqa: E402
from recipes import breast_cancer_loo as bc  # noqa: E402
from recipes import modular_arithmetic as ma  # noqa: E402


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Modular arithmetic
# ---------------------------------------------------------------------------------------------


def test_modular_data_and_model():
    cfg = ma.QUICK
    data = ma.make_data(cfg, "quad", seed=3)
    p, w = cfg.p, cfg.width
    a, b = data.tokens[:, 0], data.tokens[:, 2]
    assert torch.equal(data.labels, (a * a + a * b + b * b) % p)
    assert torch.equal(data.tokens[:, 1], torch.full_like(a, p)) and torch.equal(data.tokens[:, 3], torch.full_like(a, p + 1))
    assert torch.equal(data.groups, (a // w) * 5 + b // w) and data.groups.max() == 24
    assert len(data.train) == round(0.9 * p * p) and len(set(data.train.tolist()) & set(data.test.tolist())) == 0
    assert len(data.train) + len(data.test) == p * p
    assert ma.FULL.width == 20  # the paper's a // 20, b // 20 for p = 97
    model = ma.new_model(cfg, 0)
    x = data.tokens[:5]
    assert model(x).shape == (5, p)
    # causal: the logits at the last position do not change when nothing before it changes,
    # and the first position cannot see later tokens
    h0 = model.embed(x) + model.pos
    changed = x.clone()
    changed[:, 3] = 0
    out = model.blocks[0](h0)
    out2 = model.blocks[0](model.embed(changed) + model.pos)
    torch.testing.assert_close(out[:, :3], out2[:, :3])


def test_finetune_uses_only_selected_tasks():
    """Excluding every task but one: the step only touches that task's samples (common random
    numbers: the batches are the full-data batches with the other tasks' samples dropped)."""
    cfg = ma.QUICK
    data = ma.make_data(cfg, "add", seed=0)
    subset = np.zeros(25, dtype=bool)
    subset[7] = True
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ma.new_model(cfg, 0)

        def forward(self, tokens):
            seen.append(tokens.clone())
            return self.net(tokens)

    ma.finetune(Spy(), ma.replace(cfg, finetune_steps=12), data, subset, seed=0)
    tokens = torch.cat(seen)
    groups = (tokens[:, 0] // cfg.width) * 5 + tokens[:, 2] // cfg.width
    assert (groups == 7).all() and len(tokens) > 0


def test_modular_quick_recipe(tmp_path, restore_threads):
    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ma.main(["--quick", "--out", str(out), "--threads", "1"])
    path = out / "modular_arithmetic.json"
    assert json.loads(path.read_text())["summary"] == json.loads(json.dumps(res["summary"]))
    (run,) = res["runs"]
    cfg = res["config"]
    comp = run["comparison"]
    for key in ("gradex_kernel", "gradex_linear", "real_kernel", "real_linear"):
        assert -1.0 <= comp[key]["lds"] <= 1.0
        assert np.isfinite(comp[key]["residual_error"]) and comp[key]["residual_error"] >= 0
    assert comp["n_fit"] == cfg["n_fit"] and comp["n_heldout"] == cfg["n_subsets"] - cfg["n_fit"]

    S = np.array(run["subsets"], dtype=bool)
    F = np.array(run["real_all"])
    E = np.array(run["gradex_all"])
    assert S.shape == (cfg["n_subsets"], 25) and np.allclose(S.mean(), 0.9, atol=0.08)
    # real retraining really trained: every subset's loss moved away from W0's, differently per subset
    assert np.all(np.abs(F - run["f_w0"]) > 1e-3) and F.std() > 1e-5
    assert np.all(np.isfinite(E)) and E.std() > 0
    # the numbers are computed correctly from what was produced
    rel = np.abs(E - F) / F
    assert comp["gradex"]["relative_error_median"] == pytest.approx(np.median(rel))
    assert np.isfinite(comp["gradex"]["relative_error_median"])
    n_fit = cfg["n_fit"]
    assert comp["gradex"]["lds_heldout"] == pytest.approx(spearmanr(F[n_fit:], E[n_fit:])[0])
    # OLS with an intercept; with fewer fit subsets than tasks, the minimum-norm slope of the
    # centred problem (what LinearSurrogate documents)
    Xf = S[:n_fit].astype(float)
    slope = np.linalg.lstsq(Xf - Xf.mean(0), F[:n_fit] - F[:n_fit].mean(), rcond=None)[0]
    pred = F[:n_fit].mean() + (S[n_fit:] - Xf.mean(0)) @ slope
    assert comp["real_linear"]["lds"] == pytest.approx(spearmanr(F[n_fit:], pred)[0], abs=1e-9)

    # resumable: the retrained subsets are on disk, one file per subset, with these losses
    rdir = out / "add" / "seed0" / "retrain"
    files = sorted(os.listdir(rdir))
    assert len(files) == cfg["n_subsets"]
    rec = json.loads((rdir / files[3]).read_text())
    assert rec["losses"]["all"] == pytest.approx(F[3]) and rec["subset"] == S[3].astype(int).tolist()
    # the callback's report attributes the test loss to the 25 grid cells
    from lightning_ksm import AttributionReport

    report = AttributionReport.load(out / "add" / "seed0" / "ksm" / "report")
    assert len(report.task_names) == 25 and "all" in report.target_names
    assert run["timings"]["harvest"] > 0 and run["timings"]["retrain_training_sum"] > 0


# ---------------------------------------------------------------------------------------------
# Breast cancer: leave-one-out vs influence functions vs a linear surrogate
# ---------------------------------------------------------------------------------------------


def _refit_scipy(X, y, lam, N):
    """An independent fit (BFGS on the same objective) to check the recipe's Newton fits."""
    Xa = np.hstack([X, np.ones((len(X), 1))])
    s = 2 * y - 1

    def f(w):
        z = s * (Xa @ w)
        val = np.logaddexp(0, -z).sum() / N + 0.5 * lam * (w[:-1] ** 2).sum()
        g = Xa.T @ (-s / (1 + np.exp(z))) / N
        g[:-1] += lam * w[:-1]
        return val, g

    res = minimize(f, np.zeros(Xa.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 10_000})
    return res.x


def test_breast_cancer_quick_recipe(tmp_path):
    res = bc.main(["--quick", "--results", str(tmp_path / "bc.json")])
    assert (tmp_path / "bc.json").exists() and (tmp_path / "bc.png").stat().st_size > 10_000
    cfg = bc.LOOConfig(**res["config"])
    loo = np.array(res["scores"]["loo"])
    inf = np.array(res["scores"]["influence"])
    lin = np.array(res["scores"]["linear_surrogate"])
    assert loo.shape == inf.shape == lin.shape == (455,)
    c = res["correlations"]
    assert c["pearson_linear_vs_loo"] == pytest.approx(np.corrcoef(lin, loo)[0, 1])
    assert c["pearson_if_vs_loo"] == pytest.approx(np.corrcoef(inf, loo)[0, 1])
    assert c["pearson_if_vs_linear"] == pytest.approx(np.corrcoef(inf, lin)[0, 1])
    # Figure 1's claim on this near-linear problem (the paper: 0.97 and 0.98)
    assert c["pearson_if_vs_loo"] > 0.9 and c["pearson_linear_vs_loo"] > 0.9

    # LOO checked against an independent optimizer for a few points
    Xtr, ytr, Xte, yte, target = bc.load_data(cfg)
    x_t, y_t = Xte[target:target + 1], yte[target:target + 1]
    w_full = _refit_scipy(Xtr, ytr, cfg.lam, 455)
    np.testing.assert_allclose(w_full, res["w_full"], atol=1e-6)
    F_full = bc.point_losses(w_full, x_t, y_t)[0]
    assert res["target_loss_full"] == pytest.approx(F_full, abs=1e-8)
    for i in np.random.default_rng(1).choice(455, 3, replace=False):
        keep = np.arange(455) != i
        w = _refit_scipy(Xtr[keep], ytr[keep], cfg.lam, 455)
        assert loo[i] == pytest.approx(bc.point_losses(w, x_t, y_t)[0] - F_full, abs=1e-7)

    # the influence function from a Hessian obtained by finite differences of the gradient
    w = np.array(res["w_full"])
    eps = 1e-6
    H = np.stack([
        (bc.objective_grad(w + eps * e, Xtr, ytr, cfg.lam, 455) - bc.objective_grad(w - eps * e, Xtr, ytr, cfg.lam, 455))
        / (2 * eps) for e in np.eye(len(w))
    ])
    v = np.linalg.solve(H + cfg.damping * np.eye(len(w)), bc.point_grads(w, x_t, y_t)[0])
    np.testing.assert_allclose(inf, bc.point_grads(w, Xtr, ytr) @ v / 455, rtol=1e-4, atol=1e-9)

    # the surrogate: OLS on the documented subsets (seed + 1; 430 of 455 points each)
    rng = np.random.default_rng(cfg.seed + 1)
    S = np.zeros((cfg.n_subsets, 455))
    for r in range(cfg.n_subsets):
        S[r, rng.choice(455, cfg.subset_size, replace=False)] = 1
    F = np.array(res["subset_losses"])
    for r in (0, cfg.n_subsets - 1):
        wr = _refit_scipy(Xtr[S[r] > 0], ytr[S[r] > 0], cfg.lam, 455)
        assert F[r] == pytest.approx(bc.point_losses(wr, x_t, y_t)[0], abs=1e-8)
    # every subset has 430 points, so the coefficients are identified up to a common constant
    # (the recipe's minimum-norm fit sums them to zero); compare centred scores
    coef = np.linalg.lstsq(np.hstack([np.ones((len(S), 1)), S]), F, rcond=None)[0][1:]
    assert abs(lin.sum()) < 1e-8 * np.abs(lin).sum()
    np.testing.assert_allclose(lin, -(coef - coef.mean()), rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The planted-task recipes' brute-force scores (recipes/_planted.py)
# ---------------------------------------------------------------------------------------------


def test_planted_scores_on_a_known_outcome():
    from lightning_ksm import all_subsets

    S = all_subsets(4)
    effect = np.array([-0.3, -0.1, -0.2, 0.5])  # additive: F(s) = 1 + effect . s
    F = 1 + S @ effect
    np.testing.assert_allclose(_planted.task_effects(S, F), effect)  # brute force recovers each effect
    rng = np.random.default_rng(0)
    real = F + 0.01 * rng.standard_normal((3, len(S)))
    out = _planted.score(S, F.copy(), real, {str(i): -e for i, e in enumerate(effect)}, harmful=3)
    assert out["planted_most_harmful_in_retraining"] and out["planted_most_harmful_in_every_seed"]
    assert out["task_effect_spearman"]["report_scores"] == pytest.approx(1.0)
    assert out["spearman"]["gradex"] > 0.99 and out["spearman"]["noise_ceiling"] > 0.95
    # the trivial baseline -|s| is poor here: the planted task makes a larger subset no better
    assert out["spearman"]["minus_size"] < 0.5
    # within size: sizes 1, 2 and 3 (4, 6 and 4 subsets); a reversed estimate scores -1 there
    assert _planted.within_size(S, -F, F) == pytest.approx(-1.0)
    assert _planted.within_size(S, F, F) == pytest.approx(1.0)


def test_a_planted_run_folder_is_not_resumed_with_other_settings(tmp_path):
    from dataclasses import replace

    from recipes import gpt2_planted as g2

    _planted.check_settings(str(tmp_path), g2.FULL)  # first run: writes settings.json
    _planted.check_settings(str(tmp_path), g2.FULL)  # the same settings resume
    with pytest.raises(SystemExit, match="lr: 0.001 there, 0.0001 now"):
        _planted.check_settings(str(tmp_path), replace(g2.FULL, lr=1e-4))
    _planted.check_settings(str(tmp_path), replace(g2.FULL, projection="sjlt"), ignore=("projection",))


def test_bad_recipe_overrides_and_planted_kinds_are_refused_by_name():
    from recipes import resnet18_planted as rn

    assert _planted.parse_overrides(rn.FULL, ["lr=1e-5", "frozen_norm=true", "projection=sjlt"]) == \
        {"lr": 1e-5, "frozen_norm": True, "projection": "sjlt"}
    with pytest.raises(SystemExit, match="'learning_rate=1'.*the settings are .*'lr'"):
        _planted.parse_overrides(rn.FULL, ["learning_rate=1"])
    with pytest.raises(SystemExit, match="lr takes a float"):
        _planted.parse_overrides(rn.FULL, ["lr=fast"])
    with pytest.raises(SystemExit, match="own options"):
        _planted.parse_overrides(rn.FULL, ["seed=3"])
    with pytest.raises(ValueError, match="planted must be 'flipped' or 'scrambled', got 'swapped'"):
        _planted.plant(torch.zeros(4, dtype=torch.long), torch.arange(4), 3, "swapped", torch.Generator())
