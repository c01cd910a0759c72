"""Issue 14: nothing partial or damaged becomes a report. A harvest records what complete means and
``load`` refuses anything less (items 1, 5, 8): killed runs, dead ranks, bit flips, edited shards,
path-like keys, stale merged caches, short files, malformed manifests and full disks."""

import errno
import glob
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ksm import HarvestConfig
from lightning_ksm import fileio
from lightning_ksm.fileio import InsufficientSpaceError, WriteFailedError
from lightning_ksm.harvesting import HarvestRunner
from lightning_ksm.store import CorruptStoreError, FeatureStore, IncompleteHarvestError

CONFIG = HarvestConfig(projection="sjlt", proj_dim=8, proj_draws=1, harvest_batch_size=4)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n) % 4)


class _Dies(Dataset):
    def __init__(self, base, at):
        self.base, self.at = base, at

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt("killed")
        return self.base[i]


def _runner(path, rank=0, world=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    runner = HarvestRunner(model, path, config=CONFIG, rank=rank, world=world)
    if rank == 0:
        runner.initialize_store()
    return runner


def _plan(train, val=None):
    return [("source", DataLoader(train, batch_size=4)), ("target", DataLoader(val or _data(8, 1), batch_size=4))]


def _complete(path):
    _runner(path).run(_plan(_data(20, 0)))
    return FeatureStore(path)


def test_a_killed_harvest_is_refused_unless_partial_is_asked_for(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _runner(tmp_path).run(_plan(_Dies(_data(40, 0), at=33)))
    store = FeatureStore(tmp_path)
    assert 0 < len(store.shard_keys("source")) < 10
    with pytest.raises(IncompleteHarvestError, match=r"loader l0: 2 of 10 shards missing.*rank 0 of 1 did not finish"):
        store.load("source")
    with pytest.raises(IncompleteHarvestError, match="target"):  # the target was never reached either
        store.load("target")
    assert store.load("source", allow_partial=True).n_samples == 32
    st = store.completeness()
    assert st["complete"] is False and st["splits"]["source"] == {
        "expected_samples": 40, "stored_samples": 32, "expected_shards": 10, "stored_shards": 8}
    # Resuming completes it: the marker is written last, and only the missing chunks are computed.
    again = _runner(tmp_path)
    again.run(_plan(_data(40, 0)))
    assert again.shards_computed == 2 + 2 and store.completeness()["complete"] is True
    assert store.load("source").n_samples == 40


def test_a_rank_that_died_is_named(tmp_path):
    _runner(tmp_path, rank=0, world=2).run(_plan(_data(20, 0)))  # rank 1 never runs
    with pytest.raises(IncompleteHarvestError, match=r"rank 1 of 2 did not finish \(3 of its shards missing\)"):
        FeatureStore(tmp_path).load("source")
    _runner(tmp_path, rank=1, world=2).run(_plan(_data(20, 0)))
    assert FeatureStore(tmp_path).load("source").n_samples == 20


def test_bit_flips_and_edited_shards_are_detected(tmp_path):
    store = _complete(tmp_path)
    path = tmp_path / "source" / "l0-c1.jacobians.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="l0-c1.*does not match its checksum"):
        store.load("source")
    store = _complete(tmp_path / "b")
    np.save(tmp_path / "b" / "source" / "l0-c0.outputs.npy", np.zeros(4, np.float32))  # same shape, edited
    with pytest.raises(CorruptStoreError, match="l0-c0.outputs.npy does not match its checksum"):
        store.load("source")


def test_record_shard_keys_are_never_paths_and_malformed_manifests_are_named(tmp_path):
    store = _complete(tmp_path)
    record = tmp_path / "source" / "_records" / "l0-c0.json"
    good = record.read_text()
    record.write_text(good.replace('"key":"l0-c0"', '"key":"../../x"'))
    with pytest.raises(CorruptStoreError, match=r"l0-c0\.json: shard key '\.\./\.\./x'.*never followed"):
        store.load("source")
    record.write_text(good)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["k"] = "8"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="field 'k' must be a positive integer"):
        store.manifest()
    data = dict(data, k=8, format_version=2, splits=[1, 2])  # the old format lists shards in the manifest
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="'splits' must be an object"):
        store.manifest()
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(CorruptStoreError, match="corrupted manifest"):
        FeatureStore(tmp_path)


def test_empty_files_and_out_of_range_task_ids_are_named_errors(tmp_path):
    store = _complete(tmp_path)
    (tmp_path / "target" / "l1-c0.labels.npy").write_bytes(b"")
    with pytest.raises(CorruptStoreError, match="l1-c0.labels.npy does not match its checksum"):
        store.load("target")
    with pytest.raises(CorruptStoreError, match=r"l1-c0.labels.npy is unreadable \(EOFError"):
        store.load("target", verify=False)
    np.save(tmp_path / "source" / "l0-c0.task_ids.npy", np.array([0, 1, 2, 99]))
    with pytest.raises(CorruptStoreError, match="task ids outside its 4 task values"):
        store.load("source", verify=False)


def test_a_stale_or_short_merged_cache_is_not_trusted(tmp_path):
    store = _complete(tmp_path)
    first = np.array(store.load("source").jacobians)
    merged = glob.glob(str(tmp_path / "source" / "_merged-*.jacobians.npy"))
    assert len(merged) == 1
    # A shard rewritten with other values (same key, same rows): the old merge must not be reused.
    info = store.shard_info("source", "l0-c2")
    rng = np.random.default_rng(1)
    store.write_shard("source", "l0-c2", outputs=rng.normal(size=4), jacobians=rng.normal(size=(4, 8)),
                      labels=np.ones(4), task_ids=np.zeros(4, int), task_values=info["task_values"][:1],
                      sample_index=np.arange(8, 12), overwrite=True)
    second = np.array(store.load("source").jacobians)
    assert not np.allclose(first[8:12], second[8:12]) and np.allclose(first[:8], second[:8])
    # A short (truncated) merged file is rebuilt, never memory-mapped.
    for path in glob.glob(str(tmp_path / "source" / "_merged-*.jacobians.npy")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    np.testing.assert_array_equal(np.array(store.load("source").jacobians), second)


def test_a_damaged_merged_cache_of_the_same_size_is_rebuilt_not_trusted(tmp_path):
    """Issue 23 item 4: part of the merged file overwritten in place (same size) gave scores off by 9."""
    store = _complete(tmp_path)
    first = np.array(store.load("source").jacobians)
    [merged] = glob.glob(str(tmp_path / "source" / "_merged-*.jacobians.npy"))
    size = os.path.getsize(merged)
    with open(merged, "r+b") as f:  # the last rows' values replaced, the size and header kept
        f.seek(size - 64)
        f.write(np.full(16, 7.0, np.float32).tobytes())
    assert os.path.getsize(merged) == size
    again = np.array(FeatureStore(tmp_path).load("source").jacobians)
    np.testing.assert_array_equal(again, first)  # rebuilt from the checked shards
    assert np.array_equal(np.load(merged), first)  # and the cache on disk is whole again
    assert FeatureStore(tmp_path).cleanup() and not glob.glob(str(tmp_path / "source" / "_merged-*"))


def test_allow_partial_leaves_a_damaged_shard_out_and_names_it(tmp_path):
    """Issue 23 item 10b: --allow-partial refused a store with one corrupted shard."""
    store = _complete(tmp_path)
    path = tmp_path / "source" / "l0-c1.jacobians.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="l0-c1.*does not match its checksum.*allow_partial=True"):
        store.load("source")
    with pytest.warns(UserWarning, match=r"shard 'l0-c1' of split 'source' is damaged and was left out \(4 samples"):
        part = store.load("source", allow_partial=True)
    assert part.n_samples == 16 and [e["key"] for e in store.left_out["source"]] == ["l0-c1"]
    assert store.load("target", allow_partial=True).n_samples == 8 and store.left_out["target"] == []
    for key in ("l1-c0", "l1-c1"):  # every target shard damaged: nothing left to analyse
        (tmp_path / "target" / f"{key}.outputs.npy").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CorruptStoreError, match="every shard of split 'target'"):
        store.load("target", allow_partial=True)


def test_a_full_disk_is_a_named_error_that_keeps_the_harvest(tmp_path, monkeypatch):
    store = _complete(tmp_path)
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    for path in glob.glob(str(tmp_path / "source" / "_merged-*")):
        os.remove(path)
    with pytest.raises(InsufficientSpaceError, match="merged Jacobians.*nothing was written.*harvest itself is intact"):
        store.load("source")
    with pytest.raises(InsufficientSpaceError, match=r"shard 'l0-c0'.*shards already in the store are kept"):
        _runner(tmp_path / "new").run(_plan(_data(8, 0)))
    monkeypatch.undo()

    # The disk fills during a write: a named error, no temporary file, earlier shards kept.
    real = np.save
    calls = {"n": 0}

    def full(fh, arr, **kw):
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, arr, **kw)

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(WriteFailedError, match=r"could not be written .*disk is full.*1 shards already in the store"):
        _runner(tmp_path / "full").run(_plan(_data(8, 0)))
    monkeypatch.undo()
    assert not [p for p in glob.glob(str(tmp_path / "full" / "**" / ".*"), recursive=True) if ".tmp-" in p]
    assert FeatureStore(tmp_path / "full").shard_keys("source") == ["l0-c0"]


def test_temp_files_of_interrupted_writes_are_removed(tmp_path):
    target = tmp_path / "w0.pt"
    (tmp_path / ".w0.pt.tmp-1-abc").write_bytes(b"x")
    assert fileio.remove_temp_files(target) == [str(tmp_path / ".w0.pt.tmp-1-abc")]


def test_files_respect_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fileio.atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o600


class _Payload:
    pass


def test_snapshot_files_are_loaded_weights_only_everywhere(tmp_path):
    """Item 4: no torch.load(weights_only=False) left; RL snapshots (numpy generator states) load safely."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for d in ("lightning_ksm", "recipes") for p in (root / d).rglob("*.py")
                 if "weights_only=False" in p.read_text()]
    assert offenders == []
    rs = np.random.RandomState(0)
    torch.save({"noise": rs.get_state(), "rng": np.random.default_rng(0).bit_generator.state}, tmp_path / "w0.pt")
    assert fileio.torch_load_safe(tmp_path / "w0.pt", numpy=True)["noise"][0] == "MT19937"
    torch.save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        fileio.torch_load_safe(tmp_path / "evil.pt", numpy=True)
