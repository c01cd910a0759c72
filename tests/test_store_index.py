"""Format 3 of the feature store (issue 12, item 5): one record file per shard, merged on read.

Registering a shard no longer rewrites a list of every shard, so its cost does not grow with the
store; the records are merged on read (cached per object, only new ones parsed); a missing record
means the shard does not exist, a damaged one is a named error; stores of formats 1 and 2 are read
as they are and migrated by the first write.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from lightning_ksm.store import CorruptStoreError, FeatureStore, IncompleteHarvestError
from lightning_ksm.store import index as index_mod

K = 5
PROJ = {"kind": "sjlt", "k": K, "seed": 0}


def _init(path, **kw):
    st = FeatureStore(path)
    st.initialize(projector_config=PROJ, mode="margin", params={"w": (3, 4)}, **kw)
    return st


def _arrays(n, seed):
    rng = np.random.default_rng(seed)
    return {"outputs": rng.normal(size=n).astype(np.float32), "jacobians": rng.normal(size=(n, K)).astype(np.float32),
            "labels": np.ones(n, dtype=np.float32), "task_ids": np.arange(n) % 2}


def _write(st, key, n=2, seed=0, values=("a", "b"), split="source", **kw):
    return st.write_shard(split, key, **_arrays(n, seed), task_values=list(values), **kw)


def _record(path, split, key):
    return path / split / "_records" / f"{key}.json"


def test_records_written_by_other_objects_are_merged_on_read(tmp_path):
    a = _init(tmp_path)
    b = FeatureStore(tmp_path)  # another process, as far as caches go
    _write(a, "0", values=["a", "b"])
    assert a.shard_keys("source") == ["0"] and b.shard_keys("source") == ["0"]
    _write(b, "1", seed=1, values=["c", "a"])
    _write(b, "x", split="target", values=["z", "a"])
    assert a.shard_keys("source") == ["0", "1"] and a.splits() == ["source", "target"]
    assert a.n_rows("source") == 4 and a.task_names() == ["a", "b", "c", "z"]  # the union of every record's values
    assert [s["key"] for s in a.manifest()["splits"]["source"]["shards"]] == ["0", "1"]
    # an overwritten shard (a replaced record) is seen by an object that had parsed the old one
    _write(b, "1", n=3, seed=2, values=["c", "a"], overwrite=True)
    assert a.shard_info("source", "1")["rows"] == 3 and a.n_rows("source") == 5
    feats = a.load("source")
    np.testing.assert_array_equal(feats.outputs[2:], _arrays(3, 2)["outputs"])
    # task names fixed later are checked against what the records hold
    with pytest.raises(ValueError, match="not in task_names"):
        _init(tmp_path, task_names=["a", "b"])
    _init(tmp_path, task_names=["z", "c", "b", "a"])
    assert b.task_names() == ["z", "c", "b", "a"]


def test_a_shard_without_its_record_does_not_exist(tmp_path):
    st = _init(tmp_path)
    _write(st, "0")
    _write(st, "1", seed=1)
    os.remove(_record(tmp_path, "source", "1"))  # e.g. killed before the record was moved into place
    for store in (st, FeatureStore(tmp_path)):
        assert not store.has_shard("source", "1") and store.shard_info("source", "1") is None
        assert store.shard_keys("source") == ["0"] and store.n_rows("source") == 2
        assert len(store.load("source").outputs) == 2  # its orphan data files are ignored
    _write(st, "1", seed=1)  # and it can be written again without overwrite=True
    assert st.shard_keys("source") == ["0", "1"]
    # a split whose only shard lost its record is no split
    _write(st, "t", split="target")
    os.remove(_record(tmp_path, "target", "t"))
    assert st.splits() == ["source"]


@pytest.mark.parametrize("damage", ["torn", "not json", "wrong key", "bad rows", "empty"])
def test_a_damaged_record_is_a_named_error(tmp_path, damage):
    st = _init(tmp_path)
    _write(st, "0")
    _write(st, "1", seed=1)
    path = _record(tmp_path, "source", "1")
    good = path.read_bytes()
    bad = {"torn": good[: len(good) // 2], "not json": b"\xff\xfe", "empty": b"",
           "wrong key": good.replace(b'"key":"1"', b'"key":"0"'),
           "bad rows": good.replace(b'"rows":2', b'"rows":-2')}[damage]
    path.write_bytes(bad)
    for call in (lambda s: s.shard_keys("source"), lambda s: s.has_shard("source", "1"),
                 lambda s: s.load("source"), lambda s: s.completeness()):
        for store in (st, FeatureStore(tmp_path)):
            with pytest.raises(CorruptStoreError, match=r"corrupted shard record .*_records/1\.json.*Delete it"):
                call(store)
    assert st.has_shard("source", "0")  # the other shards are read as they are
    path.write_bytes(good)
    assert st.shard_keys("source") == ["0", "1"]


def test_record_files_that_are_not_records(tmp_path):
    st = _init(tmp_path)
    _write(st, "0")
    records = tmp_path / "source" / "_records"
    (records / ".0.json.tmp-1-abc").write_bytes(b"{")  # a write in progress (or a crashed one): ignored
    (records / "notes.txt").write_text("x")
    assert st.shard_keys("source") == ["0"]
    (records / "a b.json").write_text("{}")
    with pytest.raises(CorruptStoreError, match=r"a b\.json is not a shard record"):
        st.shard_keys("source")


def _v2_store(path, version=2):
    """A store as lightning-ksm wrote it before records (format 2: every shard listed in the manifest)."""
    split = path / "source"
    split.mkdir(parents=True)
    shards = []
    for c in range(2):
        arrays = dict(_arrays(3, c), index=np.arange(3 * c, 3 * c + 3))
        arrays["task_ids"] = arrays["task_ids"].astype(np.int64)
        sums = {}
        for name, arr in arrays.items():
            np.save(split / f"l0-c{c}.{name}.npy", arr)
            sums[name] = hashlib.sha256((split / f"l0-c{c}.{name}.npy").read_bytes()).hexdigest()
        shards.append({"key": f"l0-c{c}", "rows": 3, "task_values": ["a", "b"], "has_index": True,
                       **({"sha256": sums} if version > 1 else {})})
    manifest = {"format": "lightning-ksm-features", "format_version": version, "projector": PROJ, "k": K,
                "mode": "margin", "task_names": None, "params": [["w", [3, 4]]], "d": 12, "dtype": "float32",
                "output_shape": [], "meta": {}, "splits": {"source": {"shards": shards}}}
    if version > 1:
        manifest["harvest"] = {"world": 1, "expected": {"source": {"l0": {"samples": 6, "shards": {
            "l0-c0": 3, "l0-c1": 3}}}}, "ranks_done": [0], "complete": True}
    (path / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
    return manifest


def test_a_format_2_store_is_read_as_it_is_and_migrated_by_the_first_write(tmp_path):
    _v2_store(tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()
    st = FeatureStore(tmp_path)
    assert st.shard_keys("source") == ["l0-c0", "l0-c1"] and st.has_shard("source", "l0-c1")
    assert st.completeness()["complete"] is True
    feats = st.load("source")
    np.testing.assert_array_equal(feats.outputs, np.concatenate([_arrays(3, 0)["outputs"], _arrays(3, 1)["outputs"]]))
    assert (tmp_path / "manifest.json").read_bytes() == before  # reading never rewrites (read-only stores work)
    assert not (tmp_path / "source" / "_records").exists()
    # the first write migrates: a record per listed shard, then the manifest without the list
    _write(st, "extra", n=3, seed=5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["migrated_from"] == 2 and "splits" not in manifest
    assert sorted(os.listdir(tmp_path / "source" / "_records")) == ["extra.json", "l0-c0.json", "l0-c1.json"]
    again = FeatureStore(tmp_path)
    assert again.shard_keys("source") == ["extra", "l0-c0", "l0-c1"]
    assert again.completeness()["problems"] == ["split 'source': shards extra are not part of the recorded harvest"]
    os.remove(_record(tmp_path, "source", "extra"))
    np.testing.assert_array_equal(again.load("source").outputs, feats.outputs)  # checksums carried over


def test_a_migration_cut_short_reads_the_same(tmp_path):
    _v2_store(tmp_path)
    st = FeatureStore(tmp_path)
    expected = st.manifest()["splits"]
    st._index.write_record("source", st.shard_info("source", "l0-c0"))  # killed after one record, manifest still v2
    again = FeatureStore(tmp_path)
    assert again.manifest()["splits"] == expected and again.load("source").n_samples == 6
    again.register_plan(1, {"source": {"l0": {"samples": 6, "shards": {"l0-c0": 3, "l0-c1": 3}}}})  # finishes it
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 3
    assert FeatureStore(tmp_path).manifest()["splits"] == expected


def test_a_format_1_store_stays_possibly_incomplete_after_migration(tmp_path):
    _v2_store(tmp_path, version=1)
    st = FeatureStore(tmp_path)
    with pytest.raises(IncompleteHarvestError, match="format 1"):
        st.load("source")
    assert st.load("source", allow_partial=True).n_samples == 6
    _write(st, "extra", n=3, seed=5, sample_index=np.arange(6, 9))
    assert json.loads((tmp_path / "manifest.json").read_text())["migrated_from"] == 1
    assert "format 1" in FeatureStore(tmp_path).completeness()["problems"][0]
    assert FeatureStore(tmp_path).load("source", allow_partial=True).n_samples == 9


class _Work:
    """Counts what the store reads (metadata files parsed, bytes) and lists (directory listings)."""

    def __init__(self, monkeypatch):
        self.reads = self.bytes = self.listings = 0
        real_read, real_scandir, real_listdir = index_mod._read, os.scandir, os.listdir

        def read(path):
            raw, sig = real_read(path)
            self.reads += 1
            self.bytes += len(raw)
            return raw, sig

        def scandir(*a, **kw):
            self.listings += 1
            return real_scandir(*a, **kw)

        def listdir(*a, **kw):
            self.listings += 1
            return real_listdir(*a, **kw)

        monkeypatch.setattr(index_mod, "_read", read)
        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "listdir", listdir)

    def during(self, fn) -> tuple:
        before = (self.reads, self.bytes, self.listings)
        fn()
        return tuple(x - y for x, y in zip((self.reads, self.bytes, self.listings), before))


def test_registering_a_shard_costs_the_same_however_many_are_stored(tmp_path, monkeypatch):
    st = _init(tmp_path)
    # a plan that names every shard makes the manifest itself grow with the harvest
    st.register_plan(1, {"source": {"l0": {"samples": 2 * 250, "shards": {f"l0-c{c}": 2 for c in range(250)}}}})
    for c in range(5):
        _write(st, f"l0-c{c}", seed=c)
    work = _Work(monkeypatch)

    def writes(first):
        return lambda: [_write(st, f"l0-c{c}", seed=c) for c in range(first, first + 10)]

    def checks(first):  # what a resumed harvest asks per chunk, in a new process
        def run():
            store = FeatureStore(tmp_path)
            for c in range(first, first + 10):
                assert store.has_shard("source", f"l0-c{c}") and store.shard_info("source", f"l0-c{c}")["rows"] == 2
        return run

    early = work.during(writes(5))
    early_check = work.during(checks(0))
    monkeypatch.undo()
    for c in range(15, 240):
        _write(st, f"l0-c{c}", seed=c)
    work = _Work(monkeypatch)
    late = work.during(writes(240))
    late_check = work.during(checks(230))
    # writing reads nothing (the manifest is unchanged: a stat) and lists nothing, at 5 or at 240 shards
    assert early == late == (0, 0, 0)
    # a new object checks shards without listing: one manifest read, then one small record per shard
    assert early_check[0] == late_check[0] == 1 + 10 and early_check[2] == late_check[2] == 0
    manifest_bytes = os.path.getsize(tmp_path / "manifest.json")
    record_bytes = os.path.getsize(_record(tmp_path, "source", "l0-c0"))
    assert late_check[1] <= manifest_bytes + 10 * (record_bytes + 10)

    # merged views are refreshed by parsing only the records that are new since the last one
    reader = FeatureStore(tmp_path)
    assert len(reader.shard_keys("source")) == 250
    other = FeatureStore(tmp_path)
    for c in range(250, 253):
        _write(other, f"x{c}", seed=c)
    reads, _, listings = work.during(lambda: reader.shard_keys("source"))
    assert reads == 3 and listings == 1
    assert work.during(lambda: reader.shard_keys("source"))[0] == 0


def test_one_record_per_shard_and_a_manifest_without_shards(tmp_path):
    st = _init(tmp_path)
    for c in range(30):
        _write(st, c, seed=c, sample_index=np.arange(2 * c, 2 * c + 2))
    size = os.path.getsize(tmp_path / "manifest.json")
    _write(st, 30, seed=30)
    assert os.path.getsize(tmp_path / "manifest.json") == size  # registering a shard leaves it alone
    assert len(os.listdir(tmp_path / "source" / "_records")) == 31
    record = json.loads(_record(tmp_path, "source", "3").read_text())
    assert record["key"] == "3" and record["rows"] == 2 and record["has_index"] is True
    assert set(record["sha256"]) == {"outputs", "jacobians", "labels", "task_ids", "index"}
