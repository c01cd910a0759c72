"""The TaskAttribution callback inside a real Trainer.fit (lightning.pytorch)."""

import copy
import os
import warnings

import numpy as np
import pytest
import torch

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_ksm import AttributionReport, TaskAttribution, analyze_store
from lightning_ksm.store import FeatureStore

from lit_problem import Crashing, SimulatedKill, TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = dict(n_subsets=40, proj_dim=32, progress=False)


def trainer(tmp_path, callbacks=(), **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(
        default_root_dir=tmp_path, callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, logger=kw.pop("logger", CSVLogger(tmp_path)), accelerator="cpu",
        devices=1, **kw,
    )


def fit(tmp_path, cb=None, seed=0, callbacks_extra=(), **kw):
    L.seed_everything(seed, verbose=False)
    model = TinyNet()
    init = copy.deepcopy(model)
    train, val = make_data()
    tr = trainer(tmp_path, ([cb] if cb else []) + list(callbacks_extra), **kw)
    tr.fit(model, *loaders(train, val))
    return tr, model, init


def margins(model, X, y):
    with torch.no_grad():
        z = model(X)
    zy = z.gather(1, y[:, None])[:, 0]
    other = z.masked_fill(torch.nn.functional.one_hot(y, 2).bool(), float("-inf")).logsumexp(1)
    return (zy - other).numpy()


def test_training_is_untouched_and_report_is_written(tmp_path):
    tr0, plain, _ = fit(tmp_path / "plain")
    cb = TaskAttribution(**FAST)
    tr1, with_cb, init = fit(tmp_path / "cb", cb)
    # Same weights, same logged metrics: the harvest disturbed neither the model, its optimizer,
    # the RNG stream nor the user's logs.
    for (n, a), (_, b) in zip(plain.named_parameters(), with_cb.named_parameters()):
        assert torch.equal(a, b), n
    assert {k: float(v) for k, v in tr0.callback_metrics.items()} == {
        k: float(v) for k, v in tr1.callback_metrics.items() if not k.startswith("ksm/")
    }
    # The harvest is at W0 (the weights at fit start), not at the trained weights.
    train, val = make_data()
    target = FeatureStore(cb.harvest_dir).load("target")
    X, y, _ = val.tensors
    np.testing.assert_allclose(target.outputs, margins(init, X, y), rtol=1e-5, atol=1e-5)
    assert not np.allclose(target.outputs, margins(with_cb, X, y), atol=1e-3)
    # The report: files, reload, names, and the logger got the scores.
    assert cb.report is not None and cb.analysis_error is None
    assert cb.report_dir == os.path.join(tr1.logger.log_dir, "ksm", "report")
    loaded = AttributionReport.load(cb.report_dir)
    assert loaded.task_names == ["0", "1", "2", "3"] and loaded.target_names[-1] == "all"
    assert set(loaded.target_names[:-1]) == {"0", "1", "2", "3"}
    for f in ("scores.csv", "interactions.csv", "groups.json", "report.json", "report.html"):
        assert os.path.exists(os.path.join(cb.report_dir, f)), f
    metrics_csv = open(os.path.join(tr1.logger.log_dir, "metrics.csv")).read()
    assert "ksm/score/all/0" in metrics_csv
    # Noisy task 3 hurts task 0's neighbour-free target less than task 0 helps itself.
    scores = loaded.scores["ensemble"]
    assert scores[0, 0] > 0 and scores[0, 0] > scores[3, 0]


def test_same_seed_same_report(tmp_path):
    a, b = TaskAttribution(**FAST), TaskAttribution(**FAST)
    fit(tmp_path / "a", a)
    fit(tmp_path / "b", b)
    np.testing.assert_array_equal(a.report.scores["ensemble"], b.report.scores["ensemble"])
    np.testing.assert_array_equal(a.report.interactions, b.report.interactions)


def test_fresh_run_refuses_an_earlier_harvest_in_its_directory(tmp_path):
    first = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    fit(tmp_path / "a", first, max_epochs=1)
    StepCounter.steps = 0
    with pytest.raises(ValueError, match="already holds an earlier run's harvest"):
        fit(tmp_path / "b", TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST), max_epochs=1, callbacks_extra=[StepCounter()])
    assert StepCounter.steps == 0
    again = TaskAttribution(dirpath=str(tmp_path / "ksm"), overwrite=True, **FAST)
    with pytest.warns(UserWarning, match="deleting the earlier harvest"):
        fit(tmp_path / "c", again, seed=1, max_epochs=1)
    assert again.shards_computed > 0 and again.report is not None


def test_fast_dev_run_is_skipped(tmp_path):
    cb = TaskAttribution(**FAST)
    fit(tmp_path, cb, fast_dev_run=True, logger=False)
    assert cb.report is None and not os.path.exists(tmp_path / "ksm")


def test_snapshot_at_epoch(tmp_path):
    seen = {}

    class Capture(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen["model"] = copy.deepcopy(pl_module)

    cb = TaskAttribution(snapshot="epoch:1", **FAST)
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    train, val = make_data()
    # The capture callback runs after ours; the snapshot is taken before epoch 1's first step.
    trainer(tmp_path, [cb, Capture()], max_epochs=3).fit(model, *loaders(train, val))
    X, y, _ = val.tensors
    target = FeatureStore(cb.harvest_dir).load("target")
    np.testing.assert_allclose(target.outputs, margins(seen["model"], X, y), rtol=1e-5, atol=1e-5)


def test_analysis_failure_keeps_harvest_and_says_how_to_rerun(tmp_path, monkeypatch):
    import lightning_ksm.analysis as analysis

    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(analysis, "estimate_subsets", broken)
    cb = TaskAttribution(**FAST)
    with pytest.warns(UserWarning, match="lightning-ksm analyze"):
        _, model, _ = fit(tmp_path, cb)
    assert cb.report is None and isinstance(cb.analysis_error, RuntimeError)
    assert FeatureStore(cb.harvest_dir).exists()
    monkeypatch.undo()
    report = analyze_store(cb.harvest_dir, {"n_subsets": 30})
    assert report.task_names == ["0", "1", "2", "3"]


def test_resume_after_kill_during_harvest_recomputes_nothing(tmp_path):
    # Reference: an uninterrupted run. A mid-epoch resume does not reproduce the final weights bit for
    # bit, so the observed outcome (calibrate="effect") differs; the features must not.
    # estimator="simulate": the estimates do not depend on the run's outcome, which a mid-epoch resume changes
    # (the self-check of estimator="auto" compares each candidate with it and may choose another)
    ref = TaskAttribution(harvest_batch_size=16, calibrate="none", estimator="simulate", **FAST)
    fit(tmp_path / "ref", ref)
    total = ref.shards_computed

    # A run killed while harvesting (sample 150 of the source data), with a checkpoint from step 3.
    L.seed_everything(0, verbose=False)
    train, val = make_data()
    crashing = Crashing(train, at=150)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3, save_top_k=-1)
    cb = TaskAttribution(harvest_batch_size=16, source=loaders(crashing, val)[0], calibrate="none",
                         estimator="simulate", **FAST)

    class Arm(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            crashing.armed = not trainer.sanity_checking

    tr = trainer(tmp_path / "run", [cb, ckpt, Arm()])
    with pytest.raises(SimulatedKill):
        tr.fit(TinyNet(), *loaders(train, val))
    done = len(FeatureStore(cb.harvest_dir).shard_keys("source"))
    assert 0 < done < total

    # Resume from the last checkpoint in a fresh process-like setting: new callback, new trainer.
    crashing.armed = False
    cb2 = TaskAttribution(harvest_batch_size=16, source=loaders(crashing, val)[0], calibrate="none",
                          estimator="simulate", **FAST)
    tr2 = trainer(tmp_path / "run2", [cb2, ModelCheckpoint(dirpath=tmp_path / "ckpt2")])
    tr2.fit(TinyNet(), *loaders(train, val), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb2.output_dir == cb.output_dir  # the checkpoint's directory is kept
    assert cb2.shards_computed == total - done
    method = ref.report.default_method  # "order" where the self-check withheld the magnitudes
    assert cb2.report.default_method == method
    np.testing.assert_allclose(cb2.report.scores[method], ref.report.scores[method], rtol=1e-6, atol=1e-8)


# -- bad input fails at the first batch, before any training step ---------------------------------
class StepCounter(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        StepCounter.steps += 1


def _fit_expecting(tmp_path, cb, train, val, match):
    StepCounter.steps = 0
    L.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [cb, StepCounter()]).fit(TinyNet(), *loaders(train, val))
    assert StepCounter.steps == 0


def test_batch_without_task_ids(tmp_path):
    from torch.utils.data import TensorDataset

    train, val = make_data()
    two = TensorDataset(*train.tensors[:2])
    _fit_expecting(tmp_path, TaskAttribution(**FAST), two, val, r"task_key=.*position.*2 element.*Tensor")


def test_dict_batch_with_wrong_key(tmp_path):
    from torch.utils.data import Dataset

    class Dicts(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y, t = self.base[i]
            return {"x": x, "y": y, "group": t}

    class DictNet(TinyNet):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"], None), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch["x"], batch["y"], None), batch_idx)

    train, val = make_data()
    cb = TaskAttribution(input_key=lambda b: b["x"], label_key=lambda b: b["y"], task_key="task", **FAST)
    with pytest.raises(ValueError, match=r"task_key='task' is not a key of the batch \(keys: \['x', 'y', 'group'\]\)"):
        L.seed_everything(0, verbose=False)
        trainer(tmp_path, [cb]).fit(DictNet(), *loaders(Dicts(train), Dicts(val)))
    # The right key works.
    ok = TaskAttribution(input_key="x", label_key="y", task_key="group", **FAST)
    L.seed_everything(0, verbose=False)
    trainer(tmp_path / "ok", [ok], max_epochs=1).fit(DictNet(), *loaders(Dicts(train), Dicts(val)))
    assert ok.report is not None and ok.report.task_names == ["0", "1", "2", "3"]


def test_fewer_than_two_source_tasks(tmp_path):
    from torch.utils.data import TensorDataset

    train, val = make_data()
    X, y, t = train.tensors
    one = TensorDataset(X, y, torch.zeros_like(t))
    _fit_expecting(tmp_path, TaskAttribution(**FAST), one, val, "at least 2 source tasks")


def test_empty_target_group(tmp_path):
    from torch.utils.data import TensorDataset

    train, val = make_data()
    empty = TensorDataset(*(x[:0] for x in val.tensors))
    _fit_expecting(tmp_path, TaskAttribution(**FAST), train, empty, "no samples")


def test_output_mode_the_model_cannot_use(tmp_path):
    train, val = make_data()
    _fit_expecting(tmp_path, TaskAttribution(output="regression", **FAST), train, val, "regression")


@pytest.mark.parametrize("projection", ["sjlt", "factorized"])
def test_non_finite_gradient_names_the_parameter(tmp_path, projection):
    class Exploding(TinyNet):
        def forward(self, x):
            # A finite output whose gradient w.r.t. net.2.bias is NaN (sqrt'(0) * 0).
            return self.net(x) + torch.sqrt(self.net[2].bias * 0.0).sum()

    train, val = make_data()
    L.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match=r"net\.2\.bias"):
        trainer(tmp_path, [TaskAttribution(**{**FAST, "projection": projection})]).fit(Exploding(), *loaders(train, val))


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="n_subsets"):
        TaskAttribution(n_subsets=3)
    with pytest.raises(ValueError, match="output"):
        TaskAttribution(output="probabilities")
    with pytest.raises(ValueError, match="snapshot"):
        TaskAttribution(snapshot="epoch:x")
    with pytest.raises(TypeError, match="task_key"):
        TaskAttribution(task_key=1.5)
