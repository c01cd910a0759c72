"""The callback's checkpoint state, like ModelCheckpoint's: a state_key per instance, a checked
version, and a warning when a resumed run ignores the user's dirpath."""

import pytest

from lightning_ksm import TaskAttribution
from lightning_ksm.callbacks.base import STATE_VERSION


def test_two_instances_keep_separate_states_in_one_checkpoint():
    a, b = TaskAttribution(dirpath="runs/a"), TaskAttribution(dirpath="runs/b")
    assert a.state_key != b.state_key and "runs/a" in a.state_key
    assert TaskAttribution().state_key == TaskAttribution().state_key  # stable across processes


def test_the_state_version_is_checked():
    cb = TaskAttribution()
    cb.output_dir, cb.w0_path, cb.harvest_complete = "/tmp/x/ksm", "/tmp/x/ksm/w0.pt", True
    state = cb.state_dict()
    assert state["version"] == STATE_VERSION
    fresh = TaskAttribution()
    fresh.load_state_dict(state)
    assert (fresh.output_dir, fresh.w0_path, fresh.harvest_complete) == ("/tmp/x/ksm", "/tmp/x/ksm/w0.pt", True)
    with pytest.raises(ValueError, match=r"version 99.*reads version 1"):
        TaskAttribution().load_state_dict({**state, "version": 99})


def test_a_dirpath_other_than_the_checkpoints_warns(tmp_path):
    state = {"version": STATE_VERSION, "output_dir": str(tmp_path / "old"), "w0_path": None,
             "harvest_complete": False}
    cb = TaskAttribution(dirpath=str(tmp_path / "new"))
    with pytest.warns(UserWarning, match="keeps the checkpoint's output directory"):
        cb.load_state_dict(state)
    assert cb.output_dir == str(tmp_path / "old")
