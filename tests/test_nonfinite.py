"""Issue 23, nothing silently wrong about non-finite numbers: a run that diverged gets a report that
says so first and shows no number its NaN outcome cannot support (item 2); a NaN or inf weight in
W0 is refused at train start by name (item 8); ``analyze`` of a callback's harvest whose run record
is missing does not silently change estimator (item 8)."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L

from lightning_ksm import AnalysisConfig, AttributionReport, HarvestConfig, TaskAttribution, analyze_store
from lightning_ksm.cli import main
from lightning_ksm.harvesting import HarvestRunner

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = dict(n_subsets=30, proj_dim=16, progress=False, ensemble_samples=200)


def _trainer(root, callbacks, **kw):
    return L.Trainer(default_root_dir=root, callbacks=callbacks, max_epochs=2, enable_progress_bar=False,
                     enable_model_summary=False, logger=False, accelerator="cpu", devices=1, **kw)


class _Steps(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        _Steps.steps += 1


class Diverging(TinyNet):
    """The loss is NaN from batch 5 of epoch 0 on (before the harvest at the end of that epoch), and
    so are the trained weights."""

    def __init__(self, adam: bool):
        super().__init__()
        self.adam = adam

    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            with torch.no_grad():
                self.net[0].weight.fill_(float("nan"))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01) if self.adam else super().configure_optimizers()


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_a_diverged_run_gets_a_report_that_says_so_first(tmp_path, adam):
    # Before: run.json was not written ("could not record the run ... nan"), the report had no warning
    # and showed NaN final losses and a null effect calibration; with Adam the harvest itself crashed
    # on the NaN second moments (an error about layer hooks), killing the training run.
    cb = TaskAttribution(**FAST)
    L.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match=r"the watched run diverged \(the training loss was first NaN or inf "
                                         r"at epoch 0, batch 5; the trained weights hold NaN or inf in 'net.0.weight'"):
        _trainer(tmp_path, [cb]).fit(Diverging(adam), *loaders(*make_data()))

    with open(os.path.join(cb.output_dir, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)  # written: no NaN in it
    assert run["diverged"]["first_nonfinite_loss"] == {"epoch": 0, "batch": 5}
    assert "net.0.weight" in run["diverged"]["nonfinite_params"]
    assert "all" in run["diverged"]["nonfinite_final_losses"]
    assert not {"final_losses", "final_loss", "displacement"} & set(run)  # no outcome to show

    report = AttributionReport.load(cb.report_dir)  # the harvest at W0 is kept and analysed
    fq = report.fit_quality
    assert report.warnings()[0].startswith("THE WATCHED RUN DIVERGED: the training loss was first NaN")
    assert "effect calibration are unavailable" in report.warnings()[0]
    assert fq["run_diverged"] is True and fq["estimator"] == "proximal"
    assert not [k for k in fq if k.startswith("gradex_effect") or k.startswith("gradex_calibrate")]
    assert np.isfinite(report.losses).all()
    assert report.to_text().startswith("WARNING: THE WATCHED RUN DIVERGED")
    assert "<p class=bad><b>THE WATCHED RUN DIVERGED" in open(os.path.join(cb.report_dir, "report.html")).read()
    # following the diverged run is refused by name, not computed from NaN
    with pytest.raises(ValueError, match=r'that run diverged.*estimator="proximal"'):
        analyze_store(cb.harvest_dir, AnalysisConfig(estimator="simulate", **{k: FAST[k] for k in ("n_subsets",)}))


class InfInit(TinyNet):
    """An inf weight whose layer's tanh keeps the outputs and gradients finite: nothing else notices."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.net[0].weight[0, 0] = float("inf")


def test_a_non_finite_w0_weight_is_refused_at_train_start_by_name(tmp_path):
    # Before: the run trained 16 steps, run.json was not written, and the analysis failed with "y
    # contains a non-finite value" naming no parameter.
    _Steps.steps = 0
    with pytest.raises(ValueError, match=r"W0 \(the model's weights at the start of fit\) holds NaN or inf in "
                                         r"parameter\(s\) 'net.0.weight'; .*Fix the initialization"):
        _trainer(tmp_path, [TaskAttribution(**FAST), _Steps()]).fit(InfInit(), *loaders(*make_data()))
    assert _Steps.steps == 0
    assert not os.path.exists(tmp_path / "ksm" / "w0.pt")  # nothing that a later run would call stale
    # the other snapshots say what happened and what to do; only the linearized parameters count
    from lightning_ksm.callbacks.snapshot import check_finite_w0

    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"start of epoch 2\) holds NaN or inf in parameter\(s\) 'b'.*Training diverged"):
        check_finite_w0(state, ["a", "b"], "epoch:2")
    with pytest.raises(ValueError, match=r"snapshot checkpoint 'w.ckpt'\) holds NaN or inf in parameter\(s\) 'b'"):
        check_finite_w0(state, ["a", "b"], "w.ckpt")
    check_finite_w0(state, ["a"], "fit_start")


def _callback_like_harvest(ksm):
    """A harvest as the callback leaves it (its manifest names W0), made without training."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 4, generator=g)
    y = (X @ torch.randn(4, generator=g) > 0).long()
    data = TensorDataset(X, y, torch.arange(48) % 4)
    torch.manual_seed(0)
    runner = HarvestRunner(nn.Linear(4, 2), str(ksm / "harvest"), config=HarvestConfig(proj_dim=8),
                           meta={"w0_path": str(ksm / "w0.pt"), "w0_sha256": "0" * 64})
    runner.initialize_store()
    runner.run([("source", DataLoader(data, batch_size=16)), ("target", DataLoader(data, batch_size=16))])
    return ksm


def test_analyze_does_not_silently_change_estimator_when_the_run_record_is_missing(tmp_path, capsys):
    # Before: without run.json, estimator "auto" quietly became "proximal" instead of "simulate".
    ksm = _callback_like_harvest(tmp_path / "ksm")
    fast = ["--n-subsets", "20", "--ensemble-samples", "200"]
    assert main(["analyze", str(ksm), *fast]) == 2
    err = capsys.readouterr().err
    assert f"the record of its training run ({ksm / 'run.json'}) is missing" in err
    assert "--estimator proximal" in err
    assert not list(ksm.glob("report-*"))  # nothing half-made is left
    with pytest.raises(ValueError, match=r"run\.json.*is missing"):
        analyze_store(ksm / "harvest", AnalysisConfig(n_subsets=20))
    # the explicit choice is honoured
    assert main(["analyze", str(ksm), *fast, "--estimator", "proximal", "--out", str(tmp_path / "p")]) == 0
    assert AttributionReport.load(tmp_path / "p").fit_quality["estimator"] == "proximal"
    # with the run record back, "auto" follows the run as before
    (ksm / "run.json").write_text(json.dumps({"optimizer": {"type": "SGD", "lr": 0.1}, "steps": 5,
                                              "epoch_based": False}))
    assert main(["analyze", str(ksm), *fast, "--out", str(tmp_path / "s")]) == 0
    assert AttributionReport.load(tmp_path / "s").fit_quality["estimator"] == "simulate"


def test_the_first_non_finite_training_loss_is_located_by_epoch_and_batch():
    from types import SimpleNamespace

    from lightning_ksm.callbacks.run_record import RunRecorder

    recorder = RunRecorder()
    for epoch, batches in ((0, range(3, 8)), (1, range(8))):  # resumed at batch 3 of epoch 0
        for b in batches:
            loss = torch.tensor(float("inf") if (epoch, b) >= (1, 2) else 0.5, requires_grad=True)
            recorder.after_batch(SimpleNamespace(current_epoch=epoch, global_step=0), {"loss": loss}, b)
    recorder.finish(SimpleNamespace(global_step=13, current_epoch=1), nonfinite_params=["w"])
    assert recorder.record()["diverged"]["first_nonfinite_loss"] == {"epoch": 1, "batch": 2}
    finite = RunRecorder()
    finite.after_batch(SimpleNamespace(current_epoch=0, global_step=1), torch.tensor(0.5), 0)
    finite.finish(SimpleNamespace(global_step=1, current_epoch=0), displacement=0.1, final_losses={"all": 0.3})
    assert finite.record()["diverged"] is None and finite.record()["final_loss"] == 0.3
