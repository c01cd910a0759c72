"""docs/quickstart.md: every code block runs as written, and what the text says about the results holds.

The python blocks run in order in one namespace (like one Python session), in a temporary working
directory; the shell blocks' ``lightning-ksm`` commands run in-process through the CLI's ``main``;
the YAML block is parsed and its callback built from ``class_path`` / ``init_args``.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning", "ignore::UserWarning")


def code_blocks(language: str) -> list:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_doc_has_the_blocks_this_test_runs():
    assert len(code_blocks("python")) >= 6
    assert len(code_blocks("bash")) == 1 and len(code_blocks("yaml")) == 1
    # No other fenced languages that would go unchecked.
    fences = re.findall(r"^```(\S*)$", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(fences) % 2 == 0 and not any(fences[1::2]), "unbalanced code fences"
    assert set(fences[0::2]) <= {"python", "bash", "yaml"}, fences


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    from lightning_ksm.cli import main as cli_main

    from threadpoolctl import threadpool_limits

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models and matrices; extra threads only cost time on a shared machine
    try:
        with threadpool_limits(limits=1):
            ns: dict = {"__name__": "quickstart"}
            for i, code in enumerate(code_blocks("python")):
                exec(compile(code, f"{DOC.name}: python block {i + 1}", "exec"), ns)
            for line in code_blocks("bash")[0].strip().splitlines():
                argv = shlex.split(line)
                assert argv[0] == "lightning-ksm", line
                assert cli_main(argv[1:]) == 0, line
    finally:
        torch.set_num_threads(threads)

    # What the text claims about the first run.
    report = ns["report"]
    scores = dict(report.ranked("target"))
    assert all(scores[t] > 0 for t in ("pair-b", "helper", "pair-a")), scores
    assert report.ranked("target")[-1][0] == "noisy" and scores["noisy"] < 0
    assert set(report.top_pairs(1, "target", kind="synergy")[0][:2]) == {"pair-a", "pair-b"}
    assert report.target_names[-1] == "all" and "target" in report.target_names
    # The files and directories the text names.
    ksm = tmp_path / "runs" / "lightning_logs" / "version_0" / "ksm"
    assert Path(ns["attribution"].report_dir).resolve() == (ksm / "report").resolve()
    for name in ("report.html", "report.json", "scores.csv", "interactions.csv", "interactions.npy",
                 "best_subsets.json", "groups.json", "subsets.npy", "losses.npy"):
        assert (ksm / "report" / name).is_file(), name
    assert (ksm / "harvest" / "manifest.json").is_file() and (ksm / "w0.pt").is_file()
    assert report.groups, "the planted problem's validation data has every source task: groups exist"
    # The own-module example found its three sources; the re-analyses wrote reports.
    assert sorted(ns["own"].report.task_names) == ["0", "1", "2"]
    assert ns["again"].config["analysis"]["n_subsets"] == 200
    # The language-model example: HF dict batches, output="sequence", the run record's final loss.
    lm = ns["lm_attribution"].report
    assert lm.task_names == ["code", "math", "qa", "scraped"] and lm.config["callback"]["output"] == "sequence"
    assert lm.config["run"]["final_losses"]["all"] > 0
    assert (tmp_path / "runs" / "report-m200" / "report.json").is_file()
    assert (tmp_path / "runs" / "report-cli" / "report.json").is_file()


def test_yaml_block_builds_the_callback():
    config = yaml.safe_load(code_blocks("yaml")[0])
    (entry,) = config["trainer"]["callbacks"]
    module, _, name = entry["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    from lightning.pytorch.callbacks import Callback

    callback = cls(**entry["init_args"])
    assert isinstance(callback, Callback)
    assert callback.proj_dim == 256 and callback.analysis.n_subsets == 200
    assert callback.reader.keys["task_ids"] == 2
