"""The callback records the run it watches, and the `simulate` estimator follows it (issue #10).

Small problems against real retraining: for each optimizer setting (SGD, SGD + momentum, Adam,
AdamW, a scheduler, epoch- vs step-based), subsets of 6 tasks are really trained with that
optimizer and estimated by simulating it on the linearized model (exact Jacobians); the rank
correlation must clear a threshold that a wrong simulation (e.g. the wrong number of steps or
the proximal solve) fails.
"""

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import lightning.pytorch as L

from lightning_ksm import TaskAttribution
from lightning_ksm.config import AnalysisConfig
from lightning_ksm.estimation import estimate_subsets, resolve_estimator, simulate, subset_sample_weights
from lightning_ksm.estimation.epochs import epoch_draws
from lightning_ksm.estimation.simulate import subset_steps
from lightning_ksm.harvesting import harvest
from lightning_ksm.harvesting.projection import make_projector

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

K, DIM, PER = 6, 5, 40


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g)
    xs, ys, ts = [], [], []
    for t in range(K):
        x = torch.randn(PER * (1 + t % 3), DIM, generator=g) + 0.8 * torch.randn(DIM, generator=g)
        y = (x @ w > 0).long()
        if t in (0, 1):  # harmful: flipped labels on a share of the samples
            flip = torch.rand(len(y), generator=g) < 0.6
            y[flip] = 1 - y[flip]
        xs.append(x)
        ys.append(y)
        ts.append(torch.full((len(x),), t))
    xt = torch.randn(300, DIM, generator=g)
    return torch.cat(xs), torch.cat(ys), torch.cat(ts), xt, (xt @ w > 0).long()


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 2))


OPTIMIZERS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05), {"type": "SGD", "lr": 0.05}),
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
                     {"type": "SGD", "lr": 0.02, "momentum": 0.9}),
    "adam": (lambda p: torch.optim.Adam(p, lr=3e-3), {"type": "Adam", "lr": 3e-3, "betas": [0.9, 0.999]}),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
              {"type": "AdamW", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}),
}


def _train(data, w0, subset, make_opt, *, steps=None, epochs=None, batch=None, schedule=None):
    """Full-batch (batch=None) or minibatch training on the subset's samples; returns target loss."""
    X, y, t, xt, yt = data
    model = _net()
    model.load_state_dict(w0)
    idx = torch.nonzero(torch.as_tensor(subset)[t]).flatten()
    opt = make_opt(model.parameters())
    sched = schedule(opt) if schedule else None
    g = torch.Generator().manual_seed(0)
    if epochs is None:
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched:
                sched.step()
    else:
        for _ in range(epochs):
            order = idx[torch.randperm(len(idx), generator=g)]
            for b in range(0, len(order), batch):
                j = order[b:b + batch]
                loss = nn.functional.cross_entropy(model(X[j]), y[j])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(xt), yt))


def _features(data, w0, mode="logits"):
    X, y, t, xt, yt = data
    model = _net()
    model.load_state_dict(w0)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    proj = make_projector("identity", shapes, None)
    src = harvest(model, [(X, y, t.tolist())], projector=proj, mode=mode, task_names=list(range(K)))
    tgt = harvest(model, [(xt, yt, [0] * len(yt))], projector=proj, mode=mode)
    return src, tgt


@pytest.fixture(scope="module")
def setting():
    data = _problem()
    w0 = {k: v.clone() for k, v in _net().state_dict().items()}
    rng = np.random.default_rng(0)
    S = rng.random((14, K)) < 0.6
    S[S.sum(1) == 0, 0] = True
    return data, w0, S, _features(data, w0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_simulate_follows_each_optimizer(setting, name):
    data, w0, S, (src, tgt) = setting
    make_opt, rec = OPTIMIZERS[name]
    real = np.array([_train(data, w0, s, make_opt, steps=40) for s in S])
    run = {"optimizer": rec, "steps": 40, "epoch_based": False}
    est = simulate(src, tgt, S, run).column("all")
    assert spearmanr(est, real).correlation >= 0.8, (name, spearmanr(est, real).correlation)
    assert np.median(np.abs(est - real) / real) < 0.15


def test_simulate_follows_a_scheduler(setting):
    data, w0, S, (src, tgt) = setting
    make_opt = lambda p: torch.optim.SGD(p, lr=0.2)  # noqa: E731
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.2)  # noqa: E731
    real = np.array([_train(data, w0, s, make_opt, steps=40, schedule=sched) for s in S])
    lrs = [0.2 * 0.2 ** (i // 10) for i in range(40)]
    run = {"optimizer": {"type": "SGD", "lr": 0.2}, "steps": 40, "epoch_based": False, "lr_schedule": lrs}
    est = simulate(src, tgt, S, run).column("all")
    no_sched = simulate(src, tgt, S, dict(run, lr_schedule=None)).column("all")
    err = np.median(np.abs(est - real) / real)
    assert spearmanr(est, real).correlation >= 0.8
    assert err < np.median(np.abs(no_sched - real) / real)  # the schedule matters, and is followed


def test_epoch_based_steps_grow_with_the_subsets_data(setting):
    data, w0, S, (src, tgt) = setting
    make_opt, rec = OPTIMIZERS["sgd"]
    real = np.array([_train(data, w0, s, make_opt, epochs=3, batch=16) for s in S])
    run = {"optimizer": rec, "steps": 0, "epoch_based": True, "epochs": 3, "batch_size": 16}
    est = simulate(src, tgt, S, run).column("all")
    n_s = S.astype(int) @ np.bincount(data[2].numpy(), minlength=K)
    np.testing.assert_array_equal(subset_steps(run, n_s), 3 * np.ceil(n_s / 16))
    same_steps = simulate(src, tgt, S, {"optimizer": rec, "steps": int(3 * np.ceil(n_s.max() / 16))}).column("all")
    r_epoch, r_same = spearmanr(est, real).correlation, spearmanr(same_steps, real).correlation
    assert r_epoch >= 0.7, r_epoch
    assert r_epoch >= r_same - 0.05


def test_estimator_selection_and_errors(setting):
    data, w0, S, (src, tgt) = setting
    run = {"optimizer": {"type": "SGD", "lr": 0.05}, "steps": 10}
    assert resolve_estimator(AnalysisConfig(), run) == "simulate"
    assert resolve_estimator(AnalysisConfig(), None) == "proximal"
    with pytest.raises(ValueError, match="no run record"):
        resolve_estimator(AnalysisConfig(estimator="simulate"), None)
    res = estimate_subsets(src, tgt, S, AnalysisConfig(estimator="proximal", lam=1e-2), run=run)
    assert res.extras["estimator"] == "proximal"
    with pytest.raises(ValueError, match="estimator"):
        AnalysisConfig(estimator="newton").validate()
    with pytest.raises(ValueError, match="final_loss"):
        simulate(src, tgt, S, run, calibrate="loss")
    # sample weighting: the weights of a subset are its samples' share
    w = subset_sample_weights(S[:1], np.bincount(data[2].numpy(), minlength=K), "sample")
    assert np.isclose((w * np.bincount(data[2].numpy(), minlength=K)).sum(), 1.0)


class _Scheduled(TinyNet):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                   "interval": "step"}}


@pytest.mark.parametrize("epoch_based", [True, False])
def test_callback_records_the_run(tmp_path, epoch_based):
    L.seed_everything(0, verbose=False)
    model = _Scheduled()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = make_data()
    cb = TaskAttribution(n_subsets=20, proj_dim=16, progress=False, raise_on_analysis_error=True)
    limits = {"max_epochs": 2} if epoch_based else {"max_steps": 7, "max_epochs": 10}
    tr = L.Trainer(default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
                   accumulate_grad_batches=2, **limits)
    tr.fit(model, *loaders(train, val, batch_size=16))
    run = cb.report.config["run"]
    opt = run["optimizer"]
    assert opt["type"] == "AdamW" and opt["lr"] == 0.01 and opt["betas"] == [0.8, 0.95]
    assert opt["weight_decay"] == 0.1 and opt["final_lr"] < 0.01
    assert run["batch_size"] == 16 and run["accumulate_grad_batches"] == 2 and run["n_train_samples"] == len(train)
    assert run["epoch_based"] is epoch_based
    assert run["steps"] == tr.global_step and run["epochs"] == tr.current_epoch
    assert run["lr_schedule"][0] == 0.01 and len(run["lr_schedule"]) == run["steps"]
    assert run["lr_schedule"][-1] == pytest.approx(0.01 * 0.5 ** ((run["steps"] - 1) // 3))
    assert run["lr_schedulers"][0]["type"] == "StepLR"
    disp = float(torch.sqrt(sum(((p.detach() - w0[n]) ** 2).sum() for n, p in model.named_parameters())))
    assert run["displacement"] == pytest.approx(disp, rel=1e-6)
    X, y, _ = val.tensors
    with torch.no_grad():
        real = float(nn.functional.cross_entropy(model(X), y))
    assert run["final_loss"] == pytest.approx(real, rel=1e-5)
    on_disk = json.load(open(os.path.join(cb.output_dir, "run.json")))
    assert on_disk["steps"] == run["steps"]
    assert cb.report.fit_quality["estimator"] == "simulate"


def test_sgd_momentum_recorded(tmp_path):
    L.seed_everything(0, verbose=False)
    train, val = make_data()
    cb = TaskAttribution(n_subsets=20, proj_dim=16, progress=False, raise_on_analysis_error=True)
    tr = L.Trainer(default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1, max_epochs=1)
    tr.fit(TinyNet(), *loaders(train, val))
    opt = cb.report.config["run"]["optimizer"]
    assert opt["type"] == "SGD" and opt["momentum"] == 0.9 and opt["nesterov"] is False


def test_a_recorder_finished_without_start_records_no_optimizer_instead_of_crashing():
    from types import SimpleNamespace

    from lightning_ksm.callbacks.run_record import RunRecorder

    rec = RunRecorder()
    trainer = SimpleNamespace(global_step=3, current_epoch=1)
    rec.after_batch(trainer)  # no optimizer known: nothing recorded
    rec.finish(trainer, displacement=0.5)
    out = rec.record()
    assert out["steps"] == 3 and out["displacement"] == 0.5 and out.get("optimizer") is None
    assert out["lr_schedule"] is None


@pytest.mark.parametrize("rec,adam_as", [
    ({"type": "SGD", "lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, "auto"),
    ({"type": "Adam", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}, "preconditioned"),  # coupled decay
    ({"type": "AdamW", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}, "preconditioned"),
])
def test_the_gram_matrix_trajectory_equals_the_feature_space_one(setting, monkeypatch, rec, adam_as):
    """With more feature dims than output rows, simulate runs Z = Jf^T A in the span of the features
    (the same trajectory at a lower cost); forcing the feature-space run must give the same F^."""
    import importlib

    sim = importlib.import_module("lightning_ksm.estimation.simulate")  # the module, not the function
    data, w0, S, _ = setting
    X, y, t, xt, yt = data
    model = _net()
    model.load_state_dict(w0)
    proj = make_projector("gaussian", {n: p.shape for n, p in model.named_parameters()}, 1024, seed=0)
    src = harvest(model, [(X, y, t.tolist())], projector=proj, mode="logits", task_names=list(range(K)))
    tgt = harvest(model, [(xt, yt, [0] * len(yt))], projector=proj, mode="logits")
    assert len(y) * 2 < 2 * 1024  # n x C rows below 2k: the Gram path applies
    run = {"optimizer": rec, "steps": 25, "epoch_based": False}
    dual = simulate(src, tgt, S, run, adam_as=adam_as, dtype=torch.float64).losses
    monkeypatch.setattr(sim, "_DUAL_MAX_ROWS", 0)
    primal = simulate(src, tgt, S, run, adam_as=adam_as, dtype=torch.float64).losses
    np.testing.assert_allclose(dual, primal, rtol=1e-9, atol=1e-12)
    assert np.ptp(dual[:, -1]) > 0  # the subsets do differ


# -- issue #23 item 3: the steps and samples the run really had -------------------------------------
def _drawn_record(draws_per_epoch, steps_per_epoch, n_train):
    """An epoch-based SGD record whose run drew ``draws_per_epoch`` ({task: samples}) per epoch."""
    return {"optimizer": {"type": "SGD", "lr": 0.05}, "epoch_based": True, "epochs": len(steps_per_epoch),
            "steps": int(sum(steps_per_epoch)), "batch_size": 16, "n_train_samples": n_train,
            "per_epoch": [{"epoch": e, "steps": s, "drawn": d}
                          for e, (s, d) in enumerate(zip(steps_per_epoch, draws_per_epoch))]}


def test_simulate_runs_the_recorded_steps_on_the_samples_drawn(setting):
    """limit_train_batches: 3 batches of 16 per epoch, drawn from tasks 0 and 1 only. Before, the
    simulation ran epochs x ceil(n_s / 16) steps (60 for all tasks, against the run's 6) over all
    480 samples, so tasks 2-5, never trained on, moved every estimate."""
    data, w0, S, (src, tgt) = setting
    counts = np.bincount(data[2].numpy(), minlength=K)
    drawn = {"0": 40, "1": 8}  # the first 48 samples of an unshuffled loader: task 0, then task 1
    run = _drawn_record([drawn, drawn], [3, 3], int(counts.sum()))
    res = simulate(src, tgt, S, run)
    n_s = S.astype(np.int64) @ counts
    expect = [max(1, 2 * (-(-3 * (40 * s[0] + 8 * s[1]) // 48))) for s in S]  # 3 steps per 48 drawn
    np.testing.assert_array_equal(res.n_iter, expect)
    assert res.extras["steps"]["all_tasks"] == run["steps"] == 6
    np.testing.assert_array_equal(subset_steps(run, n_s, epoch_draws(run, list(range(K)), counts), S), expect)
    # The tasks the run never drew change nothing: s and s with tasks 2-5 swapped in or out agree.
    with_none = S.copy()
    with_none[:, 2:] = ~with_none[:, 2:]
    with_none[~S[:, :2].any(1), 2] = True  # keep every subset non-empty
    np.testing.assert_allclose(simulate(src, tgt, with_none, run).losses[S[:, :2].any(1)],
                               res.losses[S[:, :2].any(1)], rtol=1e-6)
    # A run that drew every sample (full epochs) is simulated as before: the data's shares.
    full = _drawn_record([{str(k): int(c) for k, c in enumerate(counts)}] * 2, [30, 30], int(counts.sum()))
    np.testing.assert_array_equal(simulate(src, tgt, S, full).n_iter, 2 * np.ceil(n_s / 16))


def test_a_run_that_drew_part_of_the_data_is_simulated_as_it_ran(tmp_path):
    """The issue's run: limit_train_batches=3 of an unshuffled loader (batch 16, 160 samples), 2
    epochs: 6 steps on tasks 0 and 1 only. Before: 20 steps simulated over all 160 samples, and
    tasks 2 and 3, never trained on, ranked (one as the most helpful)."""
    from torch.utils.data import DataLoader

    L.seed_everything(0, verbose=False)
    train, val = make_data(n_per_task=40)
    cb = TaskAttribution(n_subsets=20, proj_dim=16, progress=False, raise_on_analysis_error=True)
    tr = L.Trainer(default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1,
                   max_epochs=2, limit_train_batches=3)
    tr.fit(TinyNet(), DataLoader(train, batch_size=16), DataLoader(val, batch_size=32))
    report = cb.report
    # Never drawn: not ranked, and said first.
    assert report.task_names == ["0", "1"] and report.scores["ensemble"].shape[0] == 2
    assert "never drew a sample of task(s) '2', '3'" in report.warnings()[0]
    assert any("drew 48 of its 160 training samples per epoch" in n for n in report.fit_quality["notes"])
    # The steps the run made, on what it drew.
    run = report.config["run"]
    assert tr.global_step == 6 and report.fit_quality["gradex_steps"]["all_tasks"] == 6
    assert [e["drawn"] for e in run["per_epoch"]] == [{"0": 40, "1": 8}] * 2 and run["limit_train_batches"] == 3


def test_the_recorder_keeps_its_state_through_a_checkpoint_and_sees_a_mid_epoch_resume():
    from types import SimpleNamespace

    from lightning_ksm.callbacks.run_record import RunRecorder

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    reader = SimpleNamespace(read=lambda batch: (None, None, batch))
    trainer = SimpleNamespace(optimizers=[opt], global_step=0, current_epoch=0, max_steps=-1, max_epochs=2,
                              world_size=1, limit_train_batches=1.0)
    rec = RunRecorder()
    rec.start(trainer)
    for batch in ([0, 0, 1], [1, 2, 2], [0, 1, 2]):  # 3 steps of epoch 0, then a checkpoint
        trainer.global_step += 1
        rec.after_batch(trainer, batch=torch.tensor(batch), reader=reader)
        sched.step()
    state = rec.state_dict()
    # A new process: the optimizer's lr is now scheduled (0.05); the record keeps the run's own.
    again = RunRecorder()
    again.load_state_dict(state)
    again.start(trainer)
    trainer.global_step += 1
    again.after_batch(trainer, batch=torch.tensor([2, 2]), reader=reader)
    again.finish(trainer)
    out = again.record()
    assert out["optimizer"]["lr"] == 0.1 and out["lr_schedule"] == [0.1, 0.1, 0.05, 0.05]
    assert out["per_epoch"] == [{"epoch": 0, "steps": 4, "drawn": {"0": 3, "1": 3, "2": 5}}]
    assert out["resumed"] == [{"epoch": 0, "step": 3, "mid_epoch": True}]
    # Resumed from a checkpoint taken without this state: the epochs before are unknown, not guessed.
    blind = RunRecorder()
    blind.start(trainer)
    blind.finish(trainer)
    assert blind.record()["per_epoch"] is None and blind.record()["resumed"][0]["mid_epoch"] is None
    # Training batches without readable task ids: the steps per epoch, no draws.
    unread = RunRecorder()
    trainer.global_step = 0
    unread.start(trainer)
    trainer.global_step = 1
    unread.after_batch(trainer, batch=None, reader=SimpleNamespace(read=lambda batch: batch[2]))
    unread.finish(trainer)
    assert unread.record()["per_epoch"] == [{"epoch": 0, "steps": 1, "drawn": None}]
