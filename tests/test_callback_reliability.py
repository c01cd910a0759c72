"""Issue 14 inside a real Trainer.fit: the harvest at the first validation and resume from any
checkpoint (item 2), W0 found by its identity (item 3), safe snapshot checkpoints (item 4), bad
data found at train start with dataset indices (item 7), target loaders without task ids (item 10),
progress bars, the report's location and the convergence hint (item 12)."""

import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ksm import TaskAttribution
from lightning_ksm.callbacks.snapshot import MissingSnapshotError, SnapshotMismatchError
from lightning_ksm.store import FeatureStore

from lit_problem import SimulatedKill, TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = dict(n_subsets=30, proj_dim=16, progress=False, ensemble_samples=200)


def _trainer(root, callbacks, **kw):
    kw.setdefault("max_epochs", 2)
    kw.setdefault("enable_progress_bar", False)
    return L.Trainer(default_root_dir=root, callbacks=callbacks, enable_model_summary=False, logger=False,
                     accelerator="cpu", devices=1, **kw)


class KillAt(L.Callback):
    """Stands for the process dying at a training batch of an epoch."""

    def __init__(self, epoch, batch=1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise SimulatedKill("killed")


def _killed_run(root, cb, epoch=1):
    """Killed at batch 5 of ``epoch``, with a (mid-epoch) checkpoint every 2 steps."""
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=2)
    with pytest.raises(SimulatedKill):
        _trainer(root, [cb, ckpt, KillAt(epoch, batch=5)]).fit(TinyNet(), *loaders(*make_data()))
    return os.path.join(root, "ckpt", "last.ckpt")


def _resume(root, cb, ckpt, **kw):
    L.seed_everything(0, verbose=False)
    _trainer(root, [cb, ModelCheckpoint(dirpath=os.path.join(root, "ckpt2"), save_last=True)], **kw).fit(
        TinyNet(), *loaders(*make_data()), ckpt_path=ckpt)
    return cb


def test_the_harvest_runs_at_the_first_validation_and_an_end_of_epoch_resume_recomputes_nothing(tmp_path):
    seen = {}

    class Look(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen["complete"] = FeatureStore(cb.harvest_dir).completeness()["complete"]

    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    with pytest.raises(SimulatedKill):
        _trainer(tmp_path, [cb, ckpt, Look(), KillAt(1)]).fit(TinyNet(), *loaders(*make_data()))
    assert seen["complete"] is True and cb.shards_computed > 0  # harvested after epoch 0's validation
    # Resumed from the end-of-epoch checkpoint: the harvest is complete, nothing is recomputed.
    again = _resume(tmp_path, TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST), str(tmp_path / "ckpt" / "last.ckpt"))
    assert again.shards_computed == 0 and again.report is not None
    assert again.report.config["run"]["resumed"] == [{"epoch": 1, "step": 8, "mid_epoch": False}]
    assert not any("mid-epoch" in n for n in again.report.fit_quality.get("notes", []))
    # Resumed from the final checkpoint (the fit loop is done, on_train_start never runs): analysis only.
    final = _resume(tmp_path, TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST), str(tmp_path / "ckpt2" / "last.ckpt"))
    assert final.shards_computed == 0 and final.report is not None
    assert final.report.task_names == again.report.task_names


def test_a_mid_epoch_resume_is_recorded_whole_and_the_report_says_what_it_affects(tmp_path):
    """Issue #23 item 10: resumed from the checkpoint at step 12 (epoch 1, batch 4 of 8), Lightning
    restarts epoch 1's loader, so the final losses that calibrate="effect" fits every estimate to are
    not an uninterrupted run's; before, the report did not say so (and the record lost the steps and
    lr schedule before the resume)."""
    # the simulate estimator's steps are the point here (on this problem the self-check would pick proximal)
    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), estimator="simulate", **FAST)
    ckpt = _killed_run(str(tmp_path / "run"), cb, epoch=1)
    resumed = _resume(str(tmp_path / "run"), TaskAttribution(dirpath=str(tmp_path / "ksm"), estimator="simulate",
                                                             **FAST), ckpt)
    notes = resumed.report.fit_quality.get("notes", [])
    assert notes and "resumed from a mid-epoch checkpoint (epoch 1, step 12)" in notes[0]
    assert "calibrate='effect'" in notes[0] and "calibrate='none'" in notes[0]
    run = resumed.report.config["run"]
    assert run["resumed"] == [{"epoch": 1, "step": 12, "mid_epoch": True}]
    assert [e["steps"] for e in run["per_epoch"]] == [8, 8] and len(run["lr_schedule"]) == run["steps"] == 16
    assert resumed.report.fit_quality["gradex_steps"]["all_tasks"] == 16  # as an uninterrupted run


def test_resume_finds_w0_by_identity_and_never_re_snapshots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("a")
    monkeypatch.chdir(tmp_path / "a")
    cb = TaskAttribution(dirpath="rel/ksm", **FAST)  # relative
    ckpt = _killed_run(str(tmp_path / "run"), cb, epoch=0)  # killed before the harvest: none in the checkpoint
    assert cb.w0_path == str(tmp_path / "a" / "rel" / "ksm" / "w0.pt") and len(cb.w0_sha256) == 64
    w0 = tmp_path / "a" / "rel" / "ksm" / "w0.pt"
    # Moved away: a named error, not a snapshot of the trained weights.
    moved = tmp_path / "moved"
    os.rename(tmp_path / "a" / "rel" / "ksm", moved)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingSnapshotError, match="was not found.*never re-taken"):
        _resume(str(tmp_path / "r1"), TaskAttribution(**FAST), ckpt)
    # Another file at W0's place: refused.
    os.makedirs(w0.parent)
    torch.save({"x": torch.zeros(1)}, w0)
    with pytest.raises(SnapshotMismatchError, match="differs from the W0"):
        _resume(str(tmp_path / "r2"), TaskAttribution(**FAST), ckpt)
    os.remove(w0)
    # dirpath= pointing at the moved run directory finds it by its hash, from another working directory.
    found = _resume(str(tmp_path / "r3"), TaskAttribution(dirpath=str(moved), **FAST), ckpt)
    assert found.w0_path == str(moved / "w0.pt") and found.report is not None


class _Evil:
    pass


def test_snapshot_checkpoints_are_loaded_weights_only_and_resume(tmp_path):
    L.seed_everything(1, verbose=False)
    net = TinyNet()
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": net.state_dict(), "payload": _Evil()}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        _trainer(tmp_path, [TaskAttribution(snapshot=str(evil), **FAST)]).fit(TinyNet(), *loaders(*make_data()))
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": net.state_dict(), "epoch": 3, "global_step": 7}, good)
    cb = TaskAttribution(snapshot=str(good), dirpath=str(tmp_path / "ksm"), **FAST)
    ckpt = _killed_run(str(tmp_path / "run"), cb, epoch=0)
    assert cb.w0_path == str(tmp_path / "ksm" / "w0.pt")  # W0 is always the run's own file
    resumed = _resume(str(tmp_path / "run"), TaskAttribution(snapshot=str(good), dirpath=str(tmp_path / "ksm"), **FAST), ckpt)
    assert resumed.report is not None  # was: 'int' object has no attribute 'to'


class _Samples(Dataset):
    def __init__(self, base, edit=None):
        self.base, self.edit = base, edit or {}

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, t = self.base[i]
        return self.edit.get(i, lambda s: s)((x, y, t))


class _Steps(L.Callback):
    steps = 0

    def on_train_batch_end(self, *args):
        _Steps.steps += 1


def _fails_before_training(tmp_path, match, train_edit=None, val_edit=None, val=None, **cb_kw):
    train, v = make_data()
    _Steps.steps = 0
    tl, vl = loaders(_Samples(train, train_edit), _Samples(v, val_edit))
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [TaskAttribution(**{**FAST, **cb_kw}), _Steps()]).fit(
            TinyNet(), tl, val if val is not None else vl)
    assert _Steps.steps == 0


def test_bad_data_anywhere_fails_at_train_start_with_the_dataset_index(tmp_path):
    _fails_before_training(tmp_path / "a", r"training loader 'train', dataset index 150: label 5 is out of range for 2 classes",
                           train_edit={150: lambda s: (s[0], torch.tensor(5), s[2])})
    _fails_before_training(tmp_path / "b", r"validation loader 'val', dataset index 70: the input holds NaN",
                           val_edit={70: lambda s: (torch.full_like(s[0], float("nan")), s[1], s[2])})
    _fails_before_training(tmp_path / "c", r"validation loader 'val', dataset index 3: an empty-string task id",
                           val_edit={i: (lambda s: (s[0], s[1], "" if i == 3 else "x")) for i in range(80)}
                           if False else {i: (lambda s, i=i: (s[0], s[1], "" if i == 3 else "x")) for i in range(80)})
    _fails_before_training(tmp_path / "d", r"task ids 0 \(training loader 'train'.*and '0' \(validation loader 'val'.*differ only in type",
                           val_edit={i: (lambda s: (s[0], s[1], str(int(s[2])))) for i in range(80)})
    _fails_before_training(tmp_path / "e", r"task ids \[3\] that are not in task_names", task_names=[0, 1, 2])
    _fails_before_training(tmp_path / "f", r"target=\[\]\): the target list is empty", target=[])


class _TwoColumnVal(TinyNet):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch[0], batch[1]
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y), add_dataloader_idx=True)


def test_validation_loaders_without_task_ids_are_groups_named_after_them(tmp_path, capsys):
    train, val = make_data()
    X, y, _ = val.tensors
    vals = {"clean": DataLoader(TensorDataset(X[:40], y[:40]), batch_size=16),
            "shifted": DataLoader(TensorDataset(X[40:] + 0.5, y[40:]), batch_size=16)}
    cb = TaskAttribution(progress=True, **{k: v for k, v in FAST.items() if k != "progress"})
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [cb], max_epochs=1).fit(_TwoColumnVal(), loaders(train, val)[0], vals)
    assert set(cb.report.target_names) == {"clean", "shifted", "all"}
    captured = capsys.readouterr()
    assert f"report written to {cb.report_dir}" in captured.out  # the end of fit says where
    assert "TaskAttribution harvest" not in captured.err  # enable_progress_bar=False is respected
    # A source loader without task ids is still an error, and it names the loader.
    _Steps.steps = 0
    with pytest.raises(ValueError, match=r"training loader 'train', chunk l0-c0 .*task_key=2 is not a position"):
        _trainer(tmp_path / "b", [TaskAttribution(**FAST)]).fit(
            _TwoColumnVal(), DataLoader(TensorDataset(*train.tensors[:2]), batch_size=16), vals)


def test_the_convergence_warning_suggests_the_callbacks_own_setting():
    from lightning_ksm.callbacks.inputs import callback_warnings
    from lightning_ksm.estimation.solver import GradExConvergenceWarning, warn_unconverged
    import numpy as np

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with callback_warnings():
            warn_unconverged(np.array([True, False]), np.array([0.0, 1e-3]))
    texts = [str(w.message) for w in caught if issubclass(w.category, GradExConvergenceWarning)]
    assert len(texts) == 1 and "lam" in texts[0] and "max_iter" not in texts[0] and "loosen tol" not in texts[0]


class _FakeStrategy:
    def broadcast(self, obj):
        return obj

    def barrier(self, name=None):
        pass


class _FakeTrainer:
    is_global_zero = True
    world_size = 1
    strategy = _FakeStrategy()


def test_writing_w0_checks_space_cleans_earlier_temp_files_and_records_the_hash(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lightning_ksm.callbacks.snapshot import file_sha256
    from lightning_ksm.fileio import InsufficientSpaceError

    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"))
    cb.output_dir = str(tmp_path / "ksm")
    os.makedirs(cb.output_dir)
    for n in range(3):  # left by earlier attempts that died mid-write
        (tmp_path / "ksm" / f".w0.pt.tmp-{n}-abc").write_bytes(b"x" * 10)
    state = {"w": torch.zeros(1000)}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 100))
    with pytest.raises(InsufficientSpaceError, match="W0 snapshot.*nothing was written"):
        cb._save_w0(_FakeTrainer(), state)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "ksm") == []  # the earlier temp files are gone, no new one
    cb._save_w0(_FakeTrainer(), state)
    assert cb.w0_sha256 == file_sha256(cb.w0_path) and os.path.isabs(cb.w0_path)
    assert os.listdir(tmp_path / "ksm") == ["w0.pt"]


def test_resume_from_the_last_step_checkpoint_of_the_last_epoch_completes_the_harvest(tmp_path):
    """The checkpoint is saved at the last training step, before the validation (and the harvest) of
    the last epoch: the resumed run completes the harvest with the reloaded W0."""

    class KillInValidation(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                raise SimulatedKill("killed during the harvest")

    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=8)  # 8 batches
    L.seed_everything(0, verbose=False)
    with pytest.raises(SimulatedKill):  # the kill comes before the callback's harvest (callback order)
        _trainer(tmp_path, [KillInValidation(), cb, ckpt], max_epochs=1).fit(TinyNet(), *loaders(*make_data()))
    assert not cb.harvest_complete
    again = _resume(tmp_path, TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST),
                    str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=1)
    assert again.shards_computed > 0 and again.report is not None
    assert FeatureStore(again.harvest_dir).completeness()["complete"] is True


def _disk_full_after(n_shards):
    """The store's free-space check, with a disk that is full (1 kB free) once ``n_shards`` shards are written."""
    import shutil
    from collections import namedtuple
    from unittest import mock

    from lightning_ksm.store import feature_store

    real, written, usage = feature_store.ensure_free_space, [], namedtuple("usage", "total used free")

    def check(directory, nbytes, **kw):
        written.append(directory)
        with mock.patch.object(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000)):
            real(directory, nbytes, **kw) if len(written) > n_shards else None
        real(directory, nbytes, **kw)

    return check


def test_a_full_disk_during_the_harvest_keeps_training_and_says_how_to_finish(tmp_path, monkeypatch):
    """A harvest that cannot write its shards must not end the user's training: training runs to the
    end, no report is written, the stored shards are kept, and the message says how to finish; doing
    what it says (free space, resume from the last checkpoint) gives the report."""
    from lightning_ksm.fileio import InsufficientSpaceError
    from lightning_ksm.store import feature_store

    monkeypatch.setattr(feature_store, "ensure_free_space", _disk_full_after(2))
    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyNet(), *loaders(*make_data()))  # before the fix: InsufficientSpaceError after 8 steps
    texts = [str(w.message) for w in caught]
    assert trainer.current_epoch == 2 and trainer.global_step == 16  # every epoch of training ran
    assert isinstance(cb.harvest_error, InsufficientSpaceError) and not cb.harvest_complete
    assert cb.report is None and not os.path.exists(cb.report_dir)
    during = [t for t in texts if "the harvest at W0 failed" in t]
    assert len(during) == 1 and "not enough free space" in during[0] and "Training goes on" in during[0]
    assert "2 of 8 source shards" in during[0]
    end = [t for t in texts if "no report was written" in t]
    last = trainer.checkpoint_callback.best_model_path
    assert len(end) == 1 and "free some space" in end[0] and f"ckpt_path={last!r}" in end[0]
    assert FeatureStore(cb.harvest_dir).shard_keys("source") == ["l0-c0", "l0-c1"]  # kept

    monkeypatch.undo()  # space freed: resume as the message says
    again = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    _trainer(tmp_path, [again]).fit(TinyNet(), *loaders(*make_data()), ckpt_path=last)
    assert again.harvest_complete and again.report is not None and os.path.isdir(again.report_dir)
    assert again.shards_computed == 6 + 3  # only the missing source shards, and the target's
