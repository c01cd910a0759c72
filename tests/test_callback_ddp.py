"""Two CPU processes (gloo, ddp_spawn) give the same report as one process with the same batches per
step; ranks that see other data fail at train start; a full disk on one rank keeps every rank training."""

import os
from datetime import timedelta

import numpy as np
import pytest
from torch.utils.data import DataLoader, Subset

import lightning.pytorch as L
from lightning.pytorch.strategies import DDPStrategy

from lightning_ksm import AttributionReport, TaskAttribution
from lightning_ksm.store import FeatureStore

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def run(tmp_path, devices, strategy, batch_size):
    L.seed_everything(0, verbose=False)
    train, val = make_data(n_per_task=50, n_val=15)
    # Two ranks train on other batches than one process: what follows the real run (the optimizer's
    # second moments, the observed final loss) differs; everything taken at W0 must not. Each takes
    # batches of 64 samples per step (one process 64, two ranks 32 each): the same simulated run.
    cb = TaskAttribution(n_subsets=40, proj_dim=32, progress=False, harvest_batch_size=16, dirpath=str(tmp_path / "ksm"),
                         precondition="none", calibrate="none")
    tr = L.Trainer(
        default_root_dir=tmp_path, callbacks=[cb], max_epochs=1, enable_progress_bar=False,
        enable_model_summary=False, logger=False, accelerator="cpu", devices=devices, strategy=strategy,
    )
    tr.fit(TinyNet(), *loaders(train, val, batch_size=batch_size))
    return AttributionReport.load(tmp_path / "ksm" / "report"), FeatureStore(tmp_path / "ksm" / "harvest")


def test_two_ranks_match_one(tmp_path):
    import torch.multiprocessing as mp

    # ddp_spawn pickles the datasets to the workers; sharing storages by file descriptor fails in
    # some sandboxes ("unable to resize file"), the file-system strategy works everywhere.
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        _compare(tmp_path)
    finally:
        mp.set_sharing_strategy(previous)


def _compare(tmp_path):
    one, store1 = run(tmp_path / "one", 1, "auto", 64)
    two, store2 = run(tmp_path / "two", 2, "ddp_spawn", 32)
    # The simulated steps are the 4 the run made (200 samples, 64 per step), on 2 ranks too (issue #23:
    # the world size was ignored, and 7 steps of 32 were simulated); the draws are both ranks'.
    for report in (one, two):
        assert report.config["run"]["steps"] == report.fit_quality["gradex_steps"]["all_tasks"] == 4
    assert two.config["run"]["world_size"] == 2
    assert two.config["run"]["per_epoch"][0]["drawn"] == {"0": 50, "1": 50, "2": 50, "3": 50}
    # Each rank wrote its own shards; loading merges them in sample order, without duplicates.
    assert {k.split("-")[0] for k in store2.shard_keys("source")} == {"l0"}
    s1, s2 = store1.load("source"), store2.load("source")
    assert s1.n_samples == s2.n_samples == 200
    np.testing.assert_allclose(s1.jacobians, s2.jacobians, rtol=1e-5, atol=1e-6)
    assert one.task_names == two.task_names and one.target_names == two.target_names
    for method in one.scores:
        np.testing.assert_allclose(one.scores[method], two.scores[method], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one.interactions, two.interactions, rtol=1e-4, atol=1e-6)
    assert [g["tasks"] for g in one.groups] == [g["tasks"] for g in two.groups]


@pytest.fixture
def file_system_sharing():
    import torch.multiprocessing as mp

    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")  # see test_two_ranks_match_one
    yield
    mp.set_sharing_strategy(previous)


def _ddp_trainer(tmp_path, callbacks, **kw):
    # A collective that only some ranks enter fails after 60 s instead of hanging the suite.
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=timedelta(seconds=60))
    return L.Trainer(default_root_dir=tmp_path, callbacks=callbacks, max_epochs=2, enable_progress_bar=False,
                     enable_model_summary=False, logger=False, accelerator="cpu", devices=2, strategy=strategy, **kw)


class ShortOnRank1(TinyNet):
    """Rank 1 gets fewer training batches and another validation set (no distributed sampler)."""

    def __init__(self):
        super().__init__()
        self.train_set, self.val_set = make_data(n_per_task=50, n_val=15)

    def train_dataloader(self):
        n = len(self.train_set) if self.trainer.global_rank == 0 else 100
        return DataLoader(Subset(self.train_set, range(n)), batch_size=32)

    def val_dataloader(self):
        n = len(self.val_set) if self.trainer.global_rank == 0 else 40
        return DataLoader(Subset(self.val_set, range(n)), batch_size=32)


def test_ranks_that_see_other_data_fail_at_train_start_naming_the_cause(tmp_path, file_system_sharing):
    """Before: the ranks drifted apart (a hang, ended by the process group's timeout) or, with other
    validation data only, a misleading 'harvest being resumed' error after the first epoch."""
    cb = TaskAttribution(n_subsets=20, proj_dim=16, progress=False, dirpath=str(tmp_path / "ksm"))
    trainer = _ddp_trainer(tmp_path, [cb], use_distributed_sampler=False)
    with pytest.raises(Exception) as info:
        trainer.fit(ShortOnRank1())
    text = str(info.value)
    assert "different numbers of training batches per epoch (rank 0: 7, rank 1: 4)" in text
    assert "validation loader 'val': rank 0: 60 samples" in text and "rank 1: 40 samples" in text
    assert "use_distributed_sampler=False" in text and "being resumed" not in text
    assert not os.path.exists(tmp_path / "ksm" / "harvest")  # before the first training step


class FullDiskOnRank(L.Callback):
    """In ``rank``'s process, every shard write finds the disk full."""

    def __init__(self, rank):
        self.rank = rank

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            from lightning_ksm.store import feature_store
            from lightning_ksm.fileio import InsufficientSpaceError

            def full(directory, nbytes, *, what, kept=""):
                raise InsufficientSpaceError(28, f"not enough free space in {directory} to write {what} (simulated)")

            feature_store.ensure_free_space = full  # this worker process only


def test_a_full_disk_on_one_rank_keeps_every_rank_training(tmp_path, file_system_sharing, capfd):
    """Before: rank 1 raised out of fit while rank 0 waited for it in a barrier."""
    cb = TaskAttribution(n_subsets=20, proj_dim=16, progress=False, harvest_batch_size=16,
                         dirpath=str(tmp_path / "ksm"))
    train, val = make_data(n_per_task=50, n_val=15)
    _ddp_trainer(tmp_path, [cb, FullDiskOnRank(1)]).fit(TinyNet(), *loaders(train, val))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch=1-step=8.ckpt"]  # training ran to the end
    assert not os.path.exists(tmp_path / "ksm" / "report")
    store = FeatureStore(tmp_path / "ksm" / "harvest")
    assert store.completeness()["complete"] is False
    assert {int(k.split("-c")[1]) % 2 for k in store.shard_keys("source")} == {0}  # rank 0's shards are kept
    err = capfd.readouterr().err
    assert "failed on DDP rank 1" in err and "no report was written" in err and "ckpt_path=" in err
