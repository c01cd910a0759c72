"""Issue 14 on the command line: a partial harvest exits non-zero unless --allow-partial (item 1),
concurrent analyses get their own directories (item 6), ``show`` finds ``ksm/`` in a Lightning
version folder (item 12). Issue 23: a killed harvest exits 3 (item 10a); --allow-partial leaves a
corrupted shard out and says so (item 10b)."""

from __future__ import annotations

import argparse
import threading

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ksm import AttributionReport, HarvestConfig
from lightning_ksm.cli import main
from lightning_ksm.cli import analyze as analyze_cli
from lightning_ksm.harvesting import HarvestRunner

from test_store_reliability import _Dies  # a source killed at one sample (Ctrl-C, OOM killer)

FAST = ["--n-subsets", "20", "--ensemble-samples", "200"]


def _partial_harvest(directory, world=2, source=None):
    """A regression harvest whose rank 1 of 2 never ran: 3 of 5 source chunks stored (``world=1``:
    complete; ``source``: another source dataset)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g)
    y = X @ torch.randn(4, generator=g)
    data = TensorDataset(X, y, torch.arange(40) % 4)
    torch.manual_seed(0)
    runner = HarvestRunner(nn.Linear(4, 1), directory, config=HarvestConfig(output="regression", proj_dim=5,
                                                                            harvest_batch_size=8), rank=0, world=world)
    runner.initialize_store()
    runner.run([("source", DataLoader(source or data, batch_size=8)), ("target", DataLoader(data, batch_size=8))])
    return directory


def test_a_partial_harvest_exits_non_zero_unless_asked_for(tmp_path, capsys):
    ksm = tmp_path / "ksm"
    _partial_harvest(ksm / "harvest")
    assert main(["analyze", str(ksm), *FAST]) == analyze_cli.EXIT_INCOMPLETE == 3
    err = capsys.readouterr().err
    assert "incomplete" in err and "rank 1 of 2 did not finish" in err and "--allow-partial" in err
    assert not list(ksm.glob("report-*"))  # nothing half-made is left
    assert main(["analyze", str(ksm), *FAST, "--allow-partial", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "PARTIAL HARVEST" in captured.err and "PARTIAL HARVEST" in captured.out
    report = AttributionReport.load(tmp_path / "r")
    assert report.fit_quality["partial_harvest"] is True
    assert report.fit_quality["notes"][0].startswith("PARTIAL HARVEST") and "24 of 40 samples" in report.fit_quality["notes"][0]
    assert report.config["harvest_status"]["complete"] is False
    assert report.to_text().startswith("WARNING: PARTIAL HARVEST")  # the text and HTML headers say so
    assert "<p class=bad><b>PARTIAL HARVEST" in (tmp_path / "r" / "report.html").read_text()


def test_a_killed_harvest_exits_3_as_documented(tmp_path, capsys):
    """Issue 23 item 10a: a harvest killed before its target split exited 2 (a usage error), not 3."""
    ksm = tmp_path / "ksm"
    data = TensorDataset(torch.randn(40, 4), torch.randn(40), torch.arange(40) % 4)
    try:
        _partial_harvest(ksm / "harvest", world=1, source=_Dies(data, at=20))
    except KeyboardInterrupt:
        pass
    assert main(["analyze", str(ksm), *FAST]) == analyze_cli.EXIT_INCOMPLETE == 3
    err = capsys.readouterr().err
    assert "incomplete" in err and "rank 0 of 1 did not finish" in err and "--allow-partial" in err
    # --allow-partial cannot help: no target was harvested at all. Still exit 3, saying so.
    assert main(["analyze", str(ksm), *FAST, "--allow-partial"]) == 3
    assert "no 'target' split" in capsys.readouterr().err
    assert not list(ksm.glob("report-*"))


def test_allow_partial_leaves_a_corrupted_shard_out_and_says_so(tmp_path, capsys):
    """Issue 23 item 10b: --allow-partial still refused a store with one corrupted shard."""
    ksm = tmp_path / "ksm"
    _partial_harvest(ksm / "harvest", world=1)
    path = ksm / "harvest" / "source" / "l0-c2.jacobians.npy"
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x20
    path.write_bytes(bytes(raw))
    assert main(["analyze", str(ksm), *FAST]) == 3
    err = capsys.readouterr().err
    assert "'l0-c2'" in err and "does not match its checksum" in err and "--allow-partial" in err
    assert main(["analyze", str(ksm), *FAST, "--allow-partial", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "PARTIAL HARVEST" in err and "shard 'l0-c2' of split 'source' is damaged and was left out (8 samples" in err
    report = AttributionReport.load(tmp_path / "r")
    status = report.config["harvest_status"]
    assert report.fit_quality["partial_harvest"] is True and "'l0-c2'" in report.fit_quality["notes"][0]
    assert status["complete"] is False and [e["key"] for e in status["left_out"]] == ["l0-c2"]
    assert status["splits"]["source"]["stored_samples"] == 32 and report.n_tasks == 4


def test_concurrent_analyses_get_unique_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(analyze_cli.time, "strftime", lambda fmt: "20260101-120000")
    (tmp_path / "harvest").mkdir()
    args = argparse.Namespace(out=None, force=False)
    outs, barrier = [], threading.Barrier(4)

    def one():
        barrier.wait()
        outs.append(analyze_cli._resolve_out(args, tmp_path / "harvest").path)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(outs)) == 4 and all(o.is_dir() for o in outs)
    assert sorted(o.name for o in outs) == ["report-20260101-120000"] + [f"report-20260101-120000-{n}" for n in (2, 3, 4)]


def test_show_and_analyze_look_inside_ksm_of_a_lightning_version_folder(tmp_path, capsys):
    import numpy as np

    version = tmp_path / "lightning_logs" / "version_0"
    AttributionReport(["a", "b"], ["all"], {"loo": np.array([[0.5], [-0.25]])}).save(version / "ksm" / "report",
                                                                                     figures=False)
    assert main(["show", str(version)]) == 0
    assert "target 'all'" in capsys.readouterr().out
    assert analyze_cli._find_harvest  # the harvest is found the same way
    (version / "ksm" / "harvest").mkdir()
    (version / "ksm" / "harvest" / "manifest.json").write_text("{}")
    assert analyze_cli._find_harvest(str(version)) == version / "ksm" / "harvest"


def test_ranked_takes_an_int_task_id_as_the_targets_name():
    import numpy as np

    scores = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5]])
    report = AttributionReport(["0", "99"], ["0", "99", "all"], {"loo": scores})
    assert report.ranked(99)[0][0] == "99" and report.ranked(0)[0][0] == "0"  # names, not positions
    assert report.ranked(2) == report.ranked("all")  # an int that names no target is still a position
