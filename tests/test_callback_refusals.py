"""Issue 23 inside a real Trainer.fit: set-ups that used to train and then fail (or do nothing)
without a word are refused before the first training step, by name: a target group named "all"
(item 5), two callbacks sharing one output directory (item 9), limit_val_batches=0 with
target="val" (item 10a); fast_dev_run says that the callback does nothing (item 10b)."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ksm import HarvestConfig, TaskAttribution, analyze_store
from lightning_ksm.cli import main
from lightning_ksm.harvesting import HarvestRunner

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = dict(n_subsets=30, proj_dim=16, progress=False, ensemble_samples=200)


class Steps(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        Steps.steps += 1


class Renamed(Dataset):
    """``base`` with task 0 renamed ``"all"`` and the others ``"t<id>"``."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, t = self.base[i]
        return x, y, "all" if int(t) == 0 else f"t{int(t)}"


class AnyVal(TinyNet):
    """Validation batches with or without task ids, from one loader or several."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), add_dataloader_idx=True)


def _trainer(root, callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(default_root_dir=root, callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, logger=False, accelerator="cpu", devices=1, **kw)


def _refused(root, callbacks, train, val, match, model=None, **kw):
    """fit raises ValueError(match) before the first training step."""
    Steps.steps = 0
    L.seed_everything(0, verbose=False)
    with pytest.raises(ValueError, match=match):
        _trainer(root, list(callbacks) + [Steps()], **kw).fit(model or AnyVal(), train, val)
    assert Steps.steps == 0


def test_a_target_group_named_all_is_refused_before_training(tmp_path):
    """Was: trained, harvested, then the analysis failed on the duplicate target name "all" (the
    pooled group), and the suggested `lightning-ksm analyze` rerun failed the same way."""
    train, val = make_data()
    # A task id "all" in the target data (the validation loader).
    tl, vl = loaders(Renamed(train), Renamed(val))
    _refused(tmp_path / "a", [TaskAttribution(**FAST)], tl, vl,
             r"validation loader 'val', dataset index 0: the task id 'all' is the report's name for every target "
             r"sample pooled; rename that task")
    # A validation loader without task ids named "all" (a target group named after its loader).
    X, y, _ = val.tensors
    vals = {"all": DataLoader(TensorDataset(X[:40], y[:40]), batch_size=16),
            "shifted": DataLoader(TensorDataset(X[40:] + 0.5, y[40:]), batch_size=16)}
    _refused(tmp_path / "b", [TaskAttribution(**FAST)], loaders(train, val)[0], vals,
             r"the validation loader 'all' has no task ids.*give that loader another name")
    # A source task "all" that is not a target group does not clash: it still trains and reports.
    cb = TaskAttribution(**FAST)
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path / "c", [cb]).fit(AnyVal(), loaders(Renamed(train), val)[0], loaders(train, val)[1])
    assert cb.report is not None and "all" in cb.report.task_names
    assert cb.report.target_names == ["0", "1", "2", "3", "all"]


def test_an_earlier_harvest_with_a_target_group_named_all_says_what_to_rename(tmp_path, capsys):
    """A harvest written before the check (here by the runner, which has no whole-data check) is
    refused by the analysis, the API and the CLI alike, with the name and the fix, before GradEx."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g)
    y = X @ torch.randn(4, generator=g)
    rows = [(X[i], y[i], ["all", "b", "c", "d"][i % 4]) for i in range(40)]
    harvest = tmp_path / "ksm" / "harvest"
    torch.manual_seed(0)
    runner = HarvestRunner(nn.Linear(4, 1), harvest, config=HarvestConfig(output="regression", proj_dim=5))
    runner.initialize_store()
    runner.run([("source", DataLoader(rows, batch_size=8)), ("target", DataLoader(rows, batch_size=8))])
    with pytest.raises(ValueError, match=r"target data has a task id .* named 'all'.*rename that task or loader"):
        analyze_store(harvest, dict(n_subsets=20, ensemble_samples=200))
    assert main(["analyze", str(tmp_path / "ksm"), "--n-subsets", "20", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "named 'all'" in err and "rename that task or loader" in err and "duplicate" not in err


class WithCallbacks(AnyVal):
    """callbacks from configure_callbacks (Lightning's own state-key check runs only on Trainer's)."""

    def __init__(self, callbacks):
        super().__init__()
        self.extra = callbacks

    def configure_callbacks(self):
        return self.extra


def test_two_callbacks_in_one_trainer_need_their_own_dirpath(tmp_path):
    """Was: one state key and one output directory; the second callback read the first's W0 as an
    earlier run's (or, with overwrite=True, deleted it)."""
    train, val = loaders(*make_data())
    both = [TaskAttribution(overwrite=True, **FAST), TaskAttribution(overwrite=True, **FAST)]
    _refused(tmp_path / "a", [], train, val, r"two attribution callbacks.*dirpath=None and dirpath=None.*"
             r"give each its own dirpath", model=WithCallbacks(both))
    assert not os.path.exists(tmp_path / "a" / "ksm")  # refused at setup: nothing was written
    # Two spellings of one directory: two state keys, one set of files.
    same = [TaskAttribution(dirpath=str(tmp_path / "k"), **FAST),
            TaskAttribution(dirpath=str(tmp_path / "x" / ".." / "k"), **FAST)]
    assert same[0].state_key != same[1].state_key
    _refused(tmp_path / "b", same, train, val, r"two attribution callbacks .*own dirpath")
    assert not os.path.exists(tmp_path / "k")
    # Distinct dirpaths keep working, each with its own files and checkpoint state.
    a, b = TaskAttribution(dirpath=str(tmp_path / "ka"), **FAST), TaskAttribution(dirpath=str(tmp_path / "kb"), **FAST)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path / "c", [a, b, ckpt]).fit(AnyVal(), train, val)
    assert a.report is not None and b.report is not None and a.report_dir != b.report_dir
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert states[a.state_key]["output_dir"] == str(tmp_path / "ka")
    assert states[b.state_key]["output_dir"] == str(tmp_path / "kb")


def test_limit_val_batches_zero_names_the_setting(tmp_path):
    """Was: "pass val_dataloaders to fit", though they were passed."""
    train, val = loaders(*make_data())
    _refused(tmp_path, [TaskAttribution(**FAST)], train, val,
             r"limit_val_batches=0 turns them off: set limit_val_batches > 0 .* or give target= a DataLoader",
             limit_val_batches=0)
    # target= a DataLoader does not need the validation loop.
    cb = TaskAttribution(target=val, **FAST)
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path / "ok", [cb], limit_val_batches=0).fit(AnyVal(), train, val)
    assert cb.report is not None


def test_fast_dev_run_says_the_callback_does_nothing(tmp_path):
    """Was: skipped without a word."""
    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    L.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match=r"TaskAttribution does nothing under fast_dev_run.*without fast_dev_run"):
        _trainer(tmp_path, [cb], fast_dev_run=True).fit(AnyVal(), *loaders(*make_data()))
    assert cb.report is None and not os.path.exists(tmp_path / "ksm")
