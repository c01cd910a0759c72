"""The exact target readout and the preconditioned harvest (issue #10): against closed forms.

- the readout of a sample is its exact Jacobian times the (preconditioned) target loss gradient;
- its loss gradients are the ones GradEx's losses use;
- without a projection (identity) the readout changes nothing: the simulated estimate is the same;
- with a projection it removes the projection's error of the first-order term;
- the effect calibration hits the observed all-tasks loss and keeps every ranking;
- the store round-trips it, and a resumed harvest keeps the first preconditioner.
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ksm.estimation import simulate
from lightning_ksm.estimation.losses import LOSS_IMPL, MODE_TO_LOSS
from lightning_ksm.harvesting import HarvestRunner, adam_preconditioner, exact_gradients, exact_readout, harvest
from lightning_ksm.harvesting.params import projector_for_model
from lightning_ksm.harvesting.readout import ReadoutBuilder
from lightning_ksm.store import FeatureStore
from lightning_ksm.subsets import sample_subsets


def _problem(seed=0, n=96, K=4, C=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    tasks = [int(t) for t in torch.arange(n) % K]
    xt = torch.randn(40, 5, generator=g)
    yt = torch.randint(0, C, (40,), generator=g)
    tt = ["t0" if i % 2 else "t1" for i in range(40)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)).double()
    return model, (x.double(), y, tasks), (xt.double(), yt, tt)


@pytest.mark.parametrize("mode", ["margin", "logits"])
@pytest.mark.parametrize("scaled", [False, True])
def test_readout_is_the_jacobian_times_the_target_gradient(mode, scaled):
    model, (x, y, _), (xt, yt, tt) = _problem()
    scale = {n: 0.5 + torch.rand(p.shape, dtype=p.dtype) for n, p in model.named_parameters()} if scaled else None
    readout, cols = exact_readout(model, [(x, y)], [(xt, yt, tt)], mode=mode, scale=scale)
    assert cols == ["t0", "t1", "all"]
    f_src, J_src = exact_gradients(model, x, y, mode=mode)  # (n, d) or (n, C, d)
    f_tgt, J_tgt = exact_gradients(model, xt, yt, mode=mode)
    loss = LOSS_IMPL[MODE_TO_LOSS[mode]]
    C = 1 if mode != "logits" else f_tgt.shape[1]
    P = torch.as_tensor(f_tgt).double().reshape(len(yt), C, 1)
    lab = yt if mode == "logits" else torch.ones(len(yt), 1, 1, dtype=torch.float64)
    g, _ = loss.grad_and_curv(P, lab)
    g = g.reshape(len(yt), C).numpy()
    Jt = J_tgt.reshape(len(yt), C, -1)
    D = (torch.cat([scale[n].reshape(-1) for n, _ in model.named_parameters()]) ** 2).numpy() if scaled else 1.0
    Js = J_src.reshape(len(y), C, -1)
    for j, mask in enumerate([np.array(tt) == "t0", np.array(tt) == "t1", np.ones(len(tt), bool)]):
        gbar = np.einsum("xc,xcd->d", g[mask], Jt[mask]) / mask.sum()
        want = Js @ (D * gbar)
        np.testing.assert_allclose(readout[:, :, j], want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["margin", "logits", "regression", "logistic"])
def test_readout_loss_gradients_are_gradex_losses(mode):
    out = torch.randn(6, 3 if mode == "logits" else 1, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2]) if mode == "logits" else torch.randint(0, 2, (6,)).double()
    builder = ReadoutBuilder.__new__(ReadoutBuilder)
    builder.mode = mode
    got = builder._loss_gradient(out, labels)
    if mode == "logits":
        lab = labels
    elif mode == "margin":
        lab = torch.ones(6, 1, 1, dtype=torch.float64)
    else:
        lab = labels.reshape(6, 1, 1)
    want, _ = LOSS_IMPL[MODE_TO_LOSS[mode]].grad_and_curv(out.reshape(6, -1, 1), lab)
    np.testing.assert_allclose(got.numpy(), want.reshape(6, -1).numpy(), rtol=1e-12)


def _features(model, data, target, projection, k, scale=None):
    x, y, tasks = data
    xt, yt, tt = target
    proj = projector_for_model(model, projection, k, 0)
    if scale is not None:  # the gradients scaled before the projection, as the harvest applies a preconditioner
        proj = proj.with_scale(scale)
    src = harvest(model, [(x, y, tasks)], projector=proj, mode="margin")
    tgt = harvest(model, [(xt, yt, ["target"] * len(yt))], projector=proj, mode="margin")
    readout, cols = exact_readout(model, [(x, y)], [(xt, yt, ["target"] * len(yt))], mode="margin", scale=scale)
    src_r = dataclasses.replace(src, readout=readout, readout_columns=cols, preconditioned=scale is not None)
    tgt = dataclasses.replace(tgt, preconditioned=scale is not None)
    return src, src_r, tgt


RUNS = {
    "sgd_momentum": {"optimizer": {"type": "SGD", "lr": 0.3, "momentum": 0.9}, "steps": 30},
    "adamw": {"optimizer": {"type": "AdamW", "lr": 0.02, "betas": [0.9, 0.99], "weight_decay": 0.1}, "steps": 30},
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_without_a_projection_the_readout_changes_nothing(name):
    model, data, target = _problem(1)
    scale = None
    if name == "adamw":
        scale = {n: 0.5 + torch.rand(p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    src, src_r, tgt = _features(model, data, target, "identity", None, scale)
    S = sample_subsets(4, 12, p=0.6, seed=0)
    # an identity of the math, so in float64 (the default float32 trajectory agrees to ~1e-7)
    plain = simulate(src_r, tgt, S, RUNS[name], use_readout=False, dtype=torch.float64).losses
    read = simulate(src_r, tgt, S, RUNS[name], dtype=torch.float64)
    assert read.extras["exact_readout"] == ["target", "all"]
    np.testing.assert_allclose(read.losses, plain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("k", [8, 32])
def test_with_a_projection_the_readout_removes_the_first_order_error(k):
    # A gentle run (the regime of fine-tuning; docs/gradex.md shows where long, strong runs break it).
    model, data, target = _problem(2, n=160)
    run = {"optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9}, "steps": 10}
    S = sample_subsets(4, 16, p=0.6, seed=1)
    exact_src, exact_r, exact_tgt = _features(model, data, target, "identity", None)
    truth = simulate(exact_src, exact_tgt, S, run).column("all")
    errors = {"projected": [], "readout": []}
    x, y, tasks = data
    xt, yt, _ = target
    for seed in range(4):
        proj = projector_for_model(model, "gaussian", k, seed)
        src = harvest(model, [(x, y, tasks)], projector=proj, mode="margin")
        tgt = harvest(model, [(xt, yt, ["target"] * len(yt))], projector=proj, mode="margin")
        src_r = dataclasses.replace(src, readout=exact_r.readout, readout_columns=exact_r.readout_columns)
        errors["projected"].append(np.abs(simulate(src, tgt, S, run).column("all") - truth).mean())
        errors["readout"].append(np.abs(simulate(src_r, tgt, S, run).column("all") - truth).mean())
    assert np.mean(errors["readout"]) < 0.3 * np.mean(errors["projected"])


def _calibration_problem():
    """Features with the exact readout, subsets, a recorded run, its uncalibrated estimate and F(W0)."""
    model, data, target = _problem(3)
    src, src_r, tgt = _features(model, data, target, "identity", None)
    S = sample_subsets(4, 12, p=0.6, seed=2)
    run = dict(RUNS["sgd_momentum"])
    plain = simulate(src_r, tgt, S, run)
    return src_r, tgt, S, run, plain, float(np.mean(np.logaddexp(0.0, -tgt.outputs)))


def test_effect_calibration_hits_the_observed_loss_and_keeps_rankings():
    src_r, tgt, S, run, plain, f0 = _calibration_problem()
    observed = f0 + 0.5 * (plain.extras["all_tasks_estimate"]["all"] - f0)  # half the estimated change
    run["final_losses"] = {"all": observed}
    cal = simulate(src_r, tgt, S, run, calibrate="effect")
    assert cal.extras["effect_scale"]["all"] == pytest.approx(0.5, rel=1e-9)
    assert cal.extras["effect_scale"]["target"] is None  # no observation for that column: unchanged
    np.testing.assert_allclose(cal.column("all") - f0, 0.5 * (plain.column("all") - f0), rtol=1e-9)
    order = np.argsort(plain.column("all"), kind="stable")
    assert np.all(np.diff(cal.column("all")[order]) >= -1e-12)  # the same ranking
    run["final_losses"] = {"all": f0 + 1.0}  # the observation disagrees on the direction: not applied
    back = simulate(src_r, tgt, S, run, calibrate="effect")
    assert back.extras["effect_scale"]["all"] is None
    np.testing.assert_allclose(back.losses, plain.losses)


def test_the_regime_check_notes_a_linearized_run_that_does_not_follow_the_watched_one():
    from lightning_ksm.estimation.checks import REGIME_FACTOR, linear_regime_notes

    src_r, tgt, S, run, plain, f0 = _calibration_problem()
    est = plain.extras["all_tasks_estimate"]["all"] - f0
    for factor, noted in ((1.0, False), (0.5, False), (2.0, False), (1.1 * REGIME_FACTOR, True),
                          (0.9 / REGIME_FACTOR, True), (-1.0, True)):  # -1: the other direction
        run["final_losses"] = {"all": f0 + factor * est}
        change = simulate(src_r, tgt, S, run, calibrate="effect").extras["all_tasks_change"]
        assert change["all"]["estimated"] == pytest.approx(est) and "target" not in change  # no observation
        assert change["all"]["observed"] == pytest.approx(factor * est)
        notes = linear_regime_notes(change, columns=["all", "target"])
        assert bool(notes) == noted, (factor, notes)
        if noted:
            assert "'all'" in notes[0] and "retraining" in notes[0]
    # per projection draw: one draw out of the regime is enough; both barely moving is not checked
    ok, off = {"w0": 0.7, "estimated": -0.1, "observed": -0.1}, {"w0": 0.7, "estimated": 2.0, "observed": -0.1}
    assert linear_regime_notes({"all": [ok, ok]}) == [] and len(linear_regime_notes({"all": [ok, off]})) == 1
    assert linear_regime_notes({"all": {"w0": 0.7, "estimated": 0.0004, "observed": -0.0034}}) == []
    assert len(linear_regime_notes({"all": {"w0": 0.5, "estimated": 2.2, "observed": 0.003}})) == 1
    assert linear_regime_notes({"all": {"w0": 0.0, "estimated": 0.0, "observed": 0.0}}) == []  # nothing moved


def test_adam_preconditioner_is_one_over_the_root_of_the_root_of_v_hat():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-6)
    assert adam_preconditioner(opt, dict(model.named_parameters())) is None  # no step yet
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    scale = adam_preconditioner(opt, dict(model.named_parameters()))
    v = opt.state[model.weight]["exp_avg_sq"] / (1 - 0.99 ** 3)
    torch.testing.assert_close(scale["weight"], 1 / torch.sqrt(torch.sqrt(v) + 1e-6))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    sgd.step()
    assert adam_preconditioner(sgd, dict(model.named_parameters())) is None


class _Loader(torch.utils.data.DataLoader):
    pass


def _loaders(data, target):
    x, y, tasks = data
    xt, yt, tt = target
    src = [(x[i], y[i], tasks[i]) for i in range(len(y))]
    tgt = [(xt[i], yt[i], tt[i]) for i in range(len(yt))]
    return (torch.utils.data.DataLoader(src, batch_size=32), torch.utils.data.DataLoader(tgt, batch_size=16))


def test_store_keeps_the_readout_and_a_resume_keeps_the_first_preconditioner(tmp_path):
    model, data, target = _problem(4)
    src_loader, tgt_loader = _loaders(data, target)
    plan = [("source", src_loader), ("target", tgt_loader)]
    first = {n: torch.full(p.shape, 2.0, dtype=p.dtype) for n, p in model.named_parameters()}
    runner = HarvestRunner(model, tmp_path / "h", config={"proj_dim": 16}, preconditioner=first)
    runner.initialize_store()
    runner.run(plan)
    store = FeatureStore(tmp_path / "h")
    feats = store.load("source")
    assert feats.preconditioned and feats.readout_columns == ["t0", "t1", "all"]
    want, cols = exact_readout(model, [(data[0], data[1])], [target], mode="margin", scale=first)
    np.testing.assert_allclose(feats.readout, want, rtol=1e-6)
    # a second runner offered another preconditioner scales like the first harvest did
    other = {n: torch.ones(p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    again = HarvestRunner(model, tmp_path / "h", config={"proj_dim": 16}, preconditioner=other)
    assert torch.equal(again.preconditioner()["0.weight"], first["0.weight"].float())
    # precondition="none" and exact_readout=0 store plain features
    plain = HarvestRunner(model, tmp_path / "p", config={"proj_dim": 16, "precondition": "none", "exact_readout": 0},
                          preconditioner=first)
    plain.initialize_store()
    plain.run(plan)
    feats = FeatureStore(tmp_path / "p").load("source")
    assert not feats.preconditioned and feats.readout is None


def test_projection_draws_are_independent_projectors_and_their_estimates_are_averaged(tmp_path):
    from lightning_ksm.config import AnalysisConfig
    from lightning_ksm.estimation import estimate_subsets
    from lightning_ksm.harvesting.projection import make_projector, projector_from_config

    model, data, target = _problem(5)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    both = make_projector("sjlt", shapes, 16, 3, draws=2)
    g = {n: torch.randn(4, *s, dtype=torch.float64) for n, s in shapes.items()}
    assert both.seeds[0] == 3 and both.config()["draw_seeds"] == both.seeds
    for i in range(2):  # block i is exactly the projector of the i-th draw seed
        torch.testing.assert_close(both.project(g)[:, 16 * i:16 * (i + 1)],
                                   make_projector("sjlt", shapes, 16, both.seeds[i]).project(g))
    assert projector_from_config(both.config()) == both and both.k == 32
    # independent draws: proj_seed=4 shares no draw with proj_seed=3 (seeds 3, 4 and 4, 5 did)
    assert not set(make_projector("sjlt", shapes, 16, 4, draws=2).seeds) & set(both.seeds)
    # an older store's config (no draw_seeds) rebuilds the consecutive seeds it was harvested with
    legacy = {k: v for k, v in both.config().items() if k != "draw_seeds"}
    assert projector_from_config(legacy).seeds == [3, 4]
    src_loader, tgt_loader = _loaders(data, target)
    runner = HarvestRunner(model, tmp_path / "h", config={"proj_dim": 16, "proj_draws": 2})
    runner.initialize_store()
    runner.run([("source", src_loader), ("target", tgt_loader)])
    store = FeatureStore(tmp_path / "h")
    from lightning_ksm.analysis import present_tasks_only

    src, tgt = present_tasks_only(store.load("source")), store.load("target")
    assert src.projection_draws == 2 and src.proj_dim == 32
    S = sample_subsets(4, 10, p=0.6, seed=0)
    run = RUNS["sgd_momentum"]
    cfg = AnalysisConfig(calibrate="none")
    got = estimate_subsets(src, tgt, S, cfg, run=run)
    each = [simulate(src.draw(i), tgt.draw(i), S, run).losses for i in range(2)]
    np.testing.assert_allclose(got.losses, np.mean(each, axis=0), rtol=1e-10)
    assert got.extras["projection_draws"] == 2


def test_with_more_groups_than_columns_only_all_is_read_out_and_it_is_the_same():
    model, (x, y, _), (xt, yt, tt) = _problem(6)
    full, cols = exact_readout(model, [(x, y)], [(xt[:20], yt[:20], tt[:20]), (xt[20:], yt[20:], tt[20:])])
    few, few_cols = exact_readout(model, [(x, y)], [(xt[:20], yt[:20], tt[:20]), (xt[20:], yt[20:], tt[20:])],
                                  max_columns=2)
    assert cols == ["t0", "t1", "all"] and few_cols == ["all"]
    np.testing.assert_allclose(few[:, :, 0], full[:, :, 2], rtol=1e-10, atol=1e-12)


def test_bad_draws_and_readout_shapes_are_named():
    from lightning_ksm.config import AnalysisConfig
    from lightning_ksm.estimation import estimate_subsets
    from lightning_ksm.features import HarvestedFeatures
    from lightning_ksm.harvesting.projection import make_projector

    model, data, target = _problem(7)
    src, src_r, tgt = _features(model, data, target, "identity", None)
    two = dataclasses.replace(src, jacobians=np.concatenate([src.jacobians] * 2, axis=-1), projection_draws=2)
    with pytest.raises(ValueError, match="projection draws"):
        estimate_subsets(two, tgt, sample_subsets(4, 10, p=0.6, seed=0), AnalysisConfig(), run=RUNS["sgd_momentum"])
    with pytest.raises(ValueError, match="proj_draws"):
        make_projector("factorized", {n: p.shape for n, p in model.named_parameters()}, 8, 0, draws=2)
    with pytest.raises(ValueError, match="readout"):
        HarvestedFeatures(outputs=src.outputs, jacobians=src.jacobians, labels=src.labels, task_ids=src.task_ids,
                          task_names=src.task_names, readout=np.zeros((3, 1, 1)), readout_columns=["all"])
