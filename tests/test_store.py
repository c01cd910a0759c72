"""Tests for the on-disk feature store: round trip, float16, atomicity, resume, dedup, ranks, errors."""

import json
import multiprocessing
import os

import numpy as np
import pytest

from lightning_ksm import store as store_mod
from lightning_ksm.store import FeatureStore, canonical_task_names, shard_key

K = 5
PROJ = {"version": 1, "kind": "sjlt", "k": K, "seed": 0, "block_size": 100, "params": [["w", [3, 4]]], "s": 2}


def _init(path, mode="margin", dtype=None, task_names=None, proj=PROJ):
    st = FeatureStore(path, dtype=dtype)
    st.initialize(projector_config=proj, mode=mode, params={"w": (3, 4)}, task_names=task_names)
    return st


def _shard(n, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    return {
        "outputs": rng.normal(size=n).astype(np.float32) + offset,
        "jacobians": rng.normal(size=(n, K)).astype(np.float32),
        "labels": np.ones(n, dtype=np.float32),
    }


def test_round_trip_memmap_and_task_mapping(tmp_path):
    st = _init(tmp_path)
    a, b = _shard(4, 0), _shard(3, 1)
    # each shard has its own raw task values; load maps them to the sorted union
    st.write_shard("source", (0, 0), **a, task_ids=np.array([0, 1, 1, 0]), task_values=["b", "d"])
    st.write_shard("source", (0, 1), **b, task_ids=np.array([0, 0, 1]), task_values=["a", "b"])
    st.write_shard("target", "t0", **_shard(2, 2), task_ids=np.array([0, 0]), task_values=["z"])
    assert st.splits() == ["source", "target"]
    feats = st.load("source")
    assert feats.task_names == ["a", "b", "d", "z"]
    np.testing.assert_array_equal(feats.task_ids, [1, 2, 2, 1, 0, 0, 1])
    np.testing.assert_array_equal(feats.outputs, np.concatenate([a["outputs"], b["outputs"]]))
    np.testing.assert_array_equal(feats.jacobians, np.concatenate([a["jacobians"], b["jacobians"]]))
    assert isinstance(feats.jacobians, np.memmap)  # merged once into a file, then memory-mapped
    assert feats.mode == "margin" and feats.proj_dim == K
    single = st.load("target")
    assert isinstance(single.jacobians, np.memmap)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["projector"] == PROJ and manifest["d"] == 12 and manifest["dtype"] == "float32"
    assert manifest["format_version"] == 3 and "splits" not in manifest  # shards live in their own records
    assert json.loads((tmp_path / "source" / "_records" / "0-1.json").read_text())["rows"] == 3
    assert [s["rows"] for s in st.manifest()["splits"]["source"]["shards"]] == [4, 3]  # merged on read
    # a reopened store (another process) sees the same data
    again = FeatureStore(tmp_path).load("source")
    np.testing.assert_array_equal(again.jacobians, feats.jacobians)


def test_logits_mode_shapes_and_labels(tmp_path):
    st = _init(tmp_path, mode="logits")
    rng = np.random.default_rng(0)
    st.write_shard("source", 0, outputs=rng.normal(size=(3, 4)), jacobians=rng.normal(size=(3, 4, K)),
                   labels=np.array([0, 3, 2]), task_ids=np.zeros(3, int), task_values=[7])
    f = st.load("source")
    assert f.jacobians.shape == (3, 4, K) and f.labels.dtype == np.int64
    with pytest.raises(ValueError, match="per-sample shape \\[5\\]"):
        st.write_shard("source", 1, outputs=np.zeros((2, 5)), jacobians=np.zeros((2, 5, K)),
                       labels=np.zeros(2), task_ids=np.zeros(2, int), task_values=[7])


def test_float16_option(tmp_path):
    st = _init(tmp_path, dtype="float16")
    a = _shard(6, 0)
    st.write_shard("source", 0, **a, task_ids=np.zeros(6, int), task_values=[0])
    f = st.load("source")
    assert f.jacobians.dtype == np.float16
    np.testing.assert_allclose(f.jacobians.astype(np.float32), a["jacobians"], rtol=1e-3, atol=1e-3)
    assert st.load("source", dtype="float32").jacobians.dtype == np.float32
    with pytest.raises(ValueError, match="holds float16 jacobians"):
        FeatureStore(tmp_path, dtype="float32")
    big = dict(a, jacobians=a["jacobians"] * 1e6)
    with pytest.raises(ValueError, match="overflow float16"):
        st.write_shard("source", 1, **big, task_ids=np.zeros(6, int), task_values=[0])


def test_atomicity_leftovers_and_a_crash_before_the_record(tmp_path, monkeypatch):
    st = _init(tmp_path)
    a = _shard(3, 0)
    st.write_shard("source", 0, **a, task_ids=np.zeros(3, int), task_values=[0])
    # leftovers of a crashed writer: a temp file and orphan data files without a record
    (tmp_path / "source" / ".1.jacobians.npy.tmp-123-abcd").write_bytes(b"garbage")
    (tmp_path / "source" / "_records" / ".1.json.tmp-123-abcd").write_bytes(b'{"key": "1"')
    np.save(tmp_path / "source" / "1.outputs.npy", np.zeros(9))
    # a crash while moving the shard's record into place: its data is written, but it is not registered
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.sep + "_records" + os.sep in str(dst):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        st.write_shard("source", 2, **_shard(4, 1), task_ids=np.zeros(4, int), task_values=[0])
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert not st.has_shard("source", 2) and not st.has_shard("source", 1)
    assert not FeatureStore(tmp_path).has_shard("source", 2)  # nor for another process
    # the failed record's temp was removed (the crashed writer's older one is still there)
    assert [p for p in os.listdir(tmp_path / "source" / "_records") if ".tmp-" in p] == [".1.json.tmp-123-abcd"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    f = st.load("source")
    np.testing.assert_array_equal(f.outputs, a["outputs"])
    assert st.shard_keys("source") == ["0"]
    removed = st.cleanup()
    assert len(removed) == 2 and not [p for p in os.listdir(tmp_path / "source" / "_records") if ".tmp-" in p]


def test_resume_with_has_shard_and_duplicate_keys(tmp_path):
    st = _init(tmp_path)
    assert not st.has_shard("source", (1, 0))
    st.write_shard("source", (1, 0), **_shard(2, 0), task_ids=np.zeros(2, int), task_values=[0])
    assert st.has_shard("source", (1, 0)) and st.has_shard("source", "1-0")
    assert not st.has_shard("target", (1, 0))
    with pytest.raises(ValueError, match="shard '1-0' of split 'source' already exists"):
        st.write_shard("source", (1, 0), **_shard(2, 1), task_ids=np.zeros(2, int), task_values=[0])
    b = _shard(2, 1)
    st.write_shard("source", (1, 0), **b, task_ids=np.zeros(2, int), task_values=[0], overwrite=True)
    np.testing.assert_array_equal(st.load("source").outputs, b["outputs"])
    assert shard_key((3, 10)) == "3-10"
    with pytest.raises(ValueError, match="shard key"):
        shard_key("../evil")


def test_dedup_by_global_index_keeps_first_and_orders_by_index(tmp_path):
    st = _init(tmp_path)
    # rank 0 has indices 0, 2, 4; rank 1 has 1, 3, 0 (padded with a duplicate of sample 0)
    r0 = _shard(3, 0, offset=0.0)
    r1 = _shard(3, 1, offset=100.0)
    st.write_shard("source", (1, 0), **r1, task_ids=np.zeros(3, int), task_values=[0], sample_index=[1, 3, 0])
    st.write_shard("source", (0, 0), **r0, task_ids=np.zeros(3, int), task_values=[0], sample_index=[0, 2, 4])
    f = st.load("source")
    # shard-key order is rank 0 first, so sample 0 comes from rank 0
    expected = [r0["outputs"][0], r1["outputs"][0], r0["outputs"][1], r1["outputs"][1], r0["outputs"][2]]
    np.testing.assert_array_equal(f.outputs, expected)
    np.testing.assert_array_equal(f.jacobians[1], r1["jacobians"][0])
    np.testing.assert_array_equal(st.load_index("source"), [0, 1, 2, 3, 4])
    assert len(st.load("source", dedup=False).outputs) == 6
    st.write_shard("source", (2, 0), **_shard(1, 3), task_ids=np.zeros(1, int), task_values=[0])
    with pytest.raises(ValueError, match="mixes shards with and without sample indices"):
        st.load("source")


def _rank_writer(path, rank, n_shards):
    st = FeatureStore(path)
    for b in range(n_shards):
        sh = _shard(2, 100 * rank + b, offset=1000 * rank + b)
        st.write_shard("source", (rank, b), **sh, task_ids=np.zeros(2, int), task_values=[rank],
                       sample_index=[2 * (100 * rank + b), 2 * (100 * rank + b) + 1])


def test_concurrent_ranks_merge_without_losing_shards(tmp_path):
    _init(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_writer, args=(str(tmp_path), r, 15)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    st = FeatureStore(tmp_path)
    assert len(st.shard_keys("source")) == 45
    f = st.load("source")
    assert len(f.outputs) == 90 and f.task_names == [0, 1, 2]
    np.testing.assert_array_equal(np.bincount(f.task_ids), [30, 30, 30])
    # rows are ordered by global index, so rank 0's shards come first, in batch order
    np.testing.assert_array_equal(f.outputs[:2], _shard(2, 0, offset=0)["outputs"])


def test_mismatched_or_corrupted_manifest_errors(tmp_path):
    st = _init(tmp_path)
    st.write_shard("source", 0, **_shard(2, 0), task_ids=np.zeros(2, int), task_values=["x"])
    with pytest.raises(ValueError, match="different k"):
        _init(tmp_path, proj=dict(PROJ, k=7))
    with pytest.raises(ValueError, match="different mode"):
        _init(tmp_path, mode="logits")
    with pytest.raises(ValueError, match="different projector"):
        _init(tmp_path, proj=dict(PROJ, seed=1))
    with pytest.raises(ValueError, match="not in task_names"):
        _init(tmp_path, task_names=["y"])
    _init(tmp_path)  # the same settings are accepted (resume)
    with pytest.raises(ValueError, match="jacobians have k=4"):
        st.write_shard("source", 1, outputs=np.zeros(2), jacobians=np.zeros((2, 4)), labels=np.ones(2),
                       task_ids=np.zeros(2, int), task_values=["x"])
    with pytest.raises(ValueError, match="no shards for split 'target'"):
        st.load("target")
    os.remove(tmp_path / "source" / "0.jacobians.npy")
    with pytest.raises(ValueError, match="shard '0' of split 'source' is registered .* but .* is missing"):
        st.load("source")
    (tmp_path / "manifest.json").write_text('{"format": "lightning-ksm-features", "format_ver')
    with pytest.raises(ValueError, match="corrupted manifest .*manifest.json"):
        st.load("source")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lightning-ksm-features", "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        st.load("source")


def test_fixed_task_names_reject_unknown_ids(tmp_path):
    st = _init(tmp_path, task_names=["b", "a"])
    st.write_shard("source", 0, **_shard(2, 0), task_ids=np.array([0, 1]), task_values=["a", "b"])
    assert st.load("source").task_names == ["b", "a"]
    np.testing.assert_array_equal(st.load("source").task_ids, [1, 0])
    with pytest.raises(ValueError, match="unknown task id\\(s\\) \\['c'\\]"):
        st.write_shard("source", 1, **_shard(1, 0), task_ids=np.array([0]), task_values=["c"])
    assert canonical_task_names([3, "x", 1, np.int64(2), "a"]) == [1, 2, 3, "a", "x"]
