"""The self-check (issue 26): the report's estimator is the first candidate whose linearized all-tasks
run follows the watched run; when none does, the magnitudes are withheld and the warning comes first."""

import json

import numpy as np
import pytest
import torch

import lightning.pytorch as L

from lightning_ksm import AttributionReport, TaskAttribution, analyze_store
from lightning_ksm.estimation.checks import REGIME_FACTOR

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = dict(n_subsets=40, proj_dim=32, progress=False)


class AdamNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _fit(tmp_path, model, epochs):
    train, val = make_data()
    cb = TaskAttribution(dirpath=str(tmp_path / "ksm"), **FAST)
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[cb], enable_progress_bar=False, logger=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                        max_epochs=epochs)
    trainer.fit(model, *loaders(train, val))
    return cb.report


@pytest.fixture(scope="module")
def strong_run(tmp_path_factory):
    """The issue's scenario in small: a briefly pretrained W0, a scrambled source (task 3), Adam at a
    large learning rate for 5 epochs: the default estimator (simulate, exact readout) does not follow."""
    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = AdamNet(lr=0.05)
    X, y, _ = make_data()[0].tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):  # briefly pretrained
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("strong")
    return path, _fit(path, model, epochs=5)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory):
    """tests/lit_problem.py's problem as the callback tests run it: SGD with momentum, 2 epochs."""
    L.seed_everything(0, verbose=False)
    path = tmp_path_factory.mktemp("lit")
    return path, _fit(path, TinyNet(), epochs=2)


def test_a_default_that_does_not_follow_the_run_gives_way_to_a_candidate_that_does(strong_run):
    _, report = strong_run
    check = report.fit_quality["self_check"]
    default = check["candidates"]["simulate"]
    # the default's linearized all-tasks run is far off the watched run (0.09 of its change here)
    assert default["grade"] != "follows"
    assert not (1 / (2 * REGIME_FACTOR) < default["worst_ratio"] < 2 * REGIME_FACTOR), default["worst_ratio"]
    # the report's numbers come from a candidate that follows the watched run on every column and draw
    assert check["default"] == "simulate" and check["chosen"] != "simulate" and check["grade"] == "follows"
    chosen = check["candidates"][check["chosen"]]
    for column, draws in chosen["changes"].items():
        for d in draws:
            assert d["estimated"] * d["observed"] > 0, (column, d)
            assert 1 / REGIME_FACTOR < d["estimated"] / d["observed"] < REGIME_FACTOR, (column, d)
    assert report.fit_quality["estimator"] == ("proximal" if check["chosen"] == "proximal" else "simulate")
    # before: the regime warning and scores in loss units from the estimate it warned about
    assert not report.withheld and "ensemble" in report.scores and not report.warnings()
    assert report.timings["self_check"] > 0  # timed as a stage of its own (benchmarks/callback_overhead.py)
    assert any(n.startswith("self-check: the default estimator (simulate)") for n in report.fit_quality["notes"])


def test_when_no_estimator_follows_the_magnitudes_are_withheld_and_the_warning_comes_first(lit_run, tmp_path):
    path, report = lit_run
    run = dict(report.config["run"])
    changes = report.fit_quality["self_check"]["candidates"]["simulate"]["changes"]
    # a watched run whose every target loss went the other way from every estimate
    run["final_losses"] = {c: d[0]["w0"] - 2 * d[0]["estimated"] for c, d in changes.items()}
    run["final_loss"] = run["final_losses"]["all"]
    withheld = analyze_store(str(path / "ksm" / "harvest"), {"n_subsets": 40}, extra_config={"run": run})
    check = withheld.fit_quality["self_check"]
    assert check["grade"] == "does not follow" and set(check["candidates"]) == {"simulate", "simulate-projected",
                                                                                "proximal"}
    assert withheld.withheld and withheld.warnings()[0].startswith("NO ESTIMATOR FOLLOWS THE WATCHED RUN")
    # only the order is shown: no score, interval, interaction or loss in loss units
    assert list(withheld.scores) == ["order"] and withheld.default_method == "order"
    assert sorted(withheld.scores["order"][:, 0]) == list(range(1, withheld.n_tasks + 1))
    assert withheld.interactions is None and withheld.losses is None and not withheld.intervals
    for entry in withheld.best_subsets + withheld.groups:
        assert all(entry.get(k) is None for k in ("predicted_loss", "gradex_loss", "full_set_loss", "all_tasks_loss"))
        assert "predicted_interval" not in entry
    text = withheld.to_text()
    assert text.startswith("WARNING: NO ESTIMATOR FOLLOWS") and "MAGNITUDES WITHHELD" in text
    assert "predicted loss withheld" in text
    out = tmp_path / "report"
    withheld.save(str(out))
    html = (out / "report.html").read_text()
    assert html.index("NO ESTIMATOR FOLLOWS") < html.index("Ranked tasks") < html.index("MAGNITUDES WITHHELD")
    assert "Tasks that help" not in html and "ksm-grad-scores" not in html
    assert 'class="bar"' not in html  # an order has no sizes: no bars that suggest some
    assert "None (all tasks None)" not in html and "out of range" not in html  # withheld, not broken or absurd
    saved = json.loads((out / "report.json").read_text())
    assert saved["fit_quality"]["withheld"]["reason"].startswith("NO ESTIMATOR")
    assert all(e["predicted_loss"] is None for e in saved["best_subsets"])
    assert not (out / "losses.npy").exists() and (out / "scores.csv").read_text().splitlines()[0].count(",") >= 1
    back = AttributionReport.load(str(out))
    assert back.withheld and back.to_text() == text
