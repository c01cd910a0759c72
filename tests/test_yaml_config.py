"""The LightningCLI YAML form of the callback:

    trainer:
      callbacks:
        - class_path: lightning_ksm.TaskAttribution
          init_args: {task_key: 2, proj_dim: 32, n_subsets: 30, ...}

``test_lightning_cli_builds_the_configured_callback`` parses such a file with
``lightning.pytorch.cli.LightningCLI`` (needs ``jsonargparse[signatures]``, e.g. from
``lightning[pytorch-extra]``; skipped without it). ``test_yaml_init_args_are_callback_arguments_and_fit``
needs no jsonargparse: it builds the callback from the same ``init_args`` and runs a two-step fit, so
the settings of the YAML example are checked to be real constructor arguments that reach the report.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L

from lightning_ksm import AnalysisConfig, AttributionReport, TaskAttribution

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N_TASKS, DIM = 3, 4

YAML = """\
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_ksm.TaskAttribution
      init_args:
        task_key: 2
        proj_dim: 32
        n_subsets: 30
        subset_size: 2
        kernel: poly
        lam: 0.01
        seed: 7
        include: ["net.2.*"]
        dirpath: {root}/ksm
        progress: false
        raise_on_analysis_error: true
model:
  hidden: 8
data:
  batch_size: 30
"""

EXPECTED_ANALYSIS = AnalysisConfig(n_subsets=30, subset_size=2, kernel="poly", lam=0.01, seed=7)


class TinyTasks(L.LightningModule):
    """A two-layer classifier; batches are ``(x, y, task_id)`` tuples (task id at position 2)."""

    def __init__(self, hidden: int = 16, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(DIM, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TinyTaskData(L.LightningDataModule):
    """N_TASKS linearly separable tasks with different true directions; 2 training batches."""

    def __init__(self, batch_size: int = 30, n_per_task: int = 20):
        super().__init__()
        self.batch_size, self.n_per_task = batch_size, n_per_task

    def _split(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(N_TASKS, DIM, generator=torch.Generator().manual_seed(0))
        X = torch.randn(N_TASKS * n, DIM, generator=g)
        t = torch.arange(N_TASKS).repeat_interleave(n)
        return TensorDataset(X, ((X * W[t]).sum(1) > 0).long(), t)

    def train_dataloader(self):
        return DataLoader(self._split(self.n_per_task, 1), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self._split(10, 2), batch_size=self.batch_size)


def _write_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(YAML.format(root=tmp_path.as_posix()))
    return path


def _assert_configured(cb, tmp_path) -> None:
    """Every YAML init_arg reached the callback (and the rest kept their defaults)."""
    assert type(cb) is TaskAttribution
    assert cb.reader.keys["task_ids"] == 2 and type(cb.reader.keys["task_ids"]) is int
    assert cb.proj_dim == 32
    assert cb.analysis == EXPECTED_ANALYSIS
    assert list(cb.include) == ["net.2.*"]
    assert str(cb.dirpath) == f"{tmp_path.as_posix()}/ksm"
    assert cb.progress is False and cb.raise_on_analysis_error is True
    assert cb.projection == "auto" and cb.output == "margin"  # defaults untouched


def test_yaml_init_args_are_callback_arguments_and_fit(tmp_path):
    config = yaml.safe_load(_write_yaml(tmp_path).read_text())
    (entry,) = config["trainer"]["callbacks"]
    assert entry["class_path"] == "lightning_ksm.TaskAttribution"
    module_name, _, class_name = entry["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    cb = cls(**entry["init_args"])
    _assert_configured(cb, tmp_path)

    # Two steps of real training: the harvest, the analysis and the report follow the YAML settings.
    trainer_args = {k: v for k, v in config["trainer"].items() if k != "callbacks"}
    L.seed_everything(config["seed_everything"], verbose=False)
    trainer = L.Trainer(callbacks=[cb], **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyTasks(**config["model"]), datamodule=TinyTaskData(**config["data"]))
    assert trainer.global_step == 2
    assert cb.analysis_error is None
    report = AttributionReport.load(tmp_path / "ksm" / "report")
    assert report.config["analysis"] == EXPECTED_ANALYSIS.to_dict()
    assert report.config["callback"]["proj_dim"] == 32
    assert report.task_names == ["0", "1", "2"]
    assert report.subsets.shape == (30, N_TASKS) and (report.subsets.sum(axis=1) == 2).all()
    assert report.fit_quality["surrogate"]["kernel"] == "poly"
    # include=["net.2.*"]: only the last layer was linearized (2 x 8 weights + 2 biases).
    assert report.config["harvest"]["n_params"] == 2
    assert report.config["harvest"]["d"] == 2 * 8 + 2


def test_lightning_cli_builds_the_configured_callback(tmp_path, capsys):
    if importlib.util.find_spec("jsonargparse") is None:
        pytest.skip(
            "jsonargparse is not installed: LightningCLI needs 'jsonargparse[signatures]>=4.27.7' "
            "(pip install 'lightning[pytorch-extra]'); the YAML form cannot be parsed here"
        )
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE, LightningCLI

    if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
        pytest.skip(f"LightningCLI is unavailable here: {_JSONARGPARSE_SIGNATURES_AVAILABLE}")

    path = _write_yaml(tmp_path)
    cli = LightningCLI(TinyTasks, TinyTaskData, run=False, args=["--config", str(path)],
                       save_config_callback=None)
    found = [c for c in cli.trainer.callbacks if isinstance(c, TaskAttribution)]
    assert len(found) == 1
    _assert_configured(found[0], tmp_path)
    assert cli.trainer.max_steps == 2
    assert cli.model.hparams.hidden == 8 and cli.datamodule.batch_size == 30

    # A wrongly typed setting is rejected while parsing, naming the setting.
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("proj_dim: 32", "proj_dim: many"))
    with pytest.raises(SystemExit) as exc:
        LightningCLI(TinyTasks, TinyTaskData, run=False, args=["--config", str(bad)], save_config_callback=None)
    assert exc.value.code != 0
    assert "proj_dim" in capsys.readouterr().err
