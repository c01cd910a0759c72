"""Issue 14 item 13: the scores and the report land in TensorBoard, W&B (offline) and MLflow (a
local file store) where a user looks for them. One fit logs to all three (the loggers are slow to
start); a logger whose package is missing is skipped with the reason."""

import glob
import importlib.util
import json
import os

import pytest

import lightning.pytorch as L

from lightning_ksm import TaskAttribution

from lit_problem import TinyNet, loaders, make_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

HAVE = {name: importlib.util.find_spec(mod) is not None
        for name, mod in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"))}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    from lightning.pytorch.loggers import CSVLogger

    root = str(tmp_path_factory.mktemp("loggers"))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": root, "MLFLOW_ALLOW_FILE_STORE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    loggers = [CSVLogger(root, name="csv")]
    if HAVE["tensorboard"]:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.insert(0, TensorBoardLogger(root, name="tb"))
    if HAVE["wandb"]:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=root, offline=True, project="ksm"))
    if HAVE["mlflow"]:
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name="ksm", tracking_uri=f"file:{root}/mlruns"))
    cb = TaskAttribution(n_subsets=30, proj_dim=16, progress=False, ensemble_samples=200)
    L.seed_everything(0, verbose=False)
    try:
        L.Trainer(default_root_dir=root, callbacks=[cb], logger=loggers, max_epochs=1, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1).fit(TinyNet(), *loaders(*make_data()))
        if HAVE["wandb"]:
            import wandb

            wandb.finish()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return root, cb, {type(lg).__name__: lg for lg in loggers}


@pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed (pip install -e .[dev])")
def test_tensorboard_gets_the_scores_the_text_report_and_the_heatmap(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, cb, loggers = logged
    acc = EventAccumulator(loggers["TensorBoardLogger"].log_dir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "ksm/score/all/0" in tags["scalars"]
    assert acc.Scalars("ksm/score/all/0")[-1].value == pytest.approx(cb.report.scores["ensemble"][0, -1], rel=1e-5)
    assert "ksm/report/text_summary" in tags["tensors"]
    text = acc.Tensors("ksm/report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "task attribution" in text
    if importlib.util.find_spec("matplotlib"):
        assert "ksm/scores" in tags["images"]


@pytest.mark.skipif(not HAVE["wandb"], reason="wandb is not installed (pip install -e .[dev])")
def test_wandb_offline_run_holds_the_scores_table_and_the_html_report(logged):
    root, cb, _ = logged
    run = glob.glob(os.path.join(root, "wandb", "offline-run-*"))
    assert len(run) == 1
    tables = glob.glob(os.path.join(run[0], "files", "media", "table", "ksm", "scores_*.table.json"))
    table = json.load(open(tables[0]))
    assert table["columns"] == ["target", "task", "score"]
    rows = {(t, task): s for t, task, s in table["data"]}
    assert rows[("all", "0")] == pytest.approx(cb.report.scores["ensemble"][0, -1], rel=1e-6)
    assert glob.glob(os.path.join(run[0], "files", "media", "html", "ksm", "report_*.html"))
    blob = open(glob.glob(os.path.join(run[0], "run-*.wandb"))[0], "rb").read()
    assert b"ksm/score/all/0" in blob  # the summary metrics are in the run's history


@pytest.mark.skipif(not HAVE["mlflow"], reason="mlflow is not installed (pip install -e .[dev])")
def test_mlflow_run_holds_the_metrics_and_the_report_artifacts(logged):
    import mlflow

    root, cb, loggers = logged
    ml = loggers["MLFlowLogger"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{root}/mlruns")
    run = client.get_run(ml.run_id)
    assert run.data.metrics["ksm/score/all/0"] == pytest.approx(cb.report.scores["ensemble"][0, -1], rel=1e-6)
    names = {a.path for a in client.list_artifacts(ml.run_id, "ksm_report")}
    assert {"ksm_report/report.html", "ksm_report/report.json", "ksm_report/scores.csv"} <= names
