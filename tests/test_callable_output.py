"""A callable output (``output=fn``: one scalar per sample) is refused at construction without the
GradEx loss it needs, and before the first step with labels GradEx cannot read (token labels padded
per batch used to fail after training with a raw numpy concatenate error); with both right it
trains and the run record's final losses are the callable's under that loss (they were silently
missing: cross-entropy was applied to the raw outputs)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L

from lightning_ksm import TaskAttribution

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def log_odds(outputs, labels):
    """Not the 2-class cross-entropy's margin (that would hide a record that applies cross-entropy)."""
    return 2.0 * outputs[:, 1] - outputs[:, 0] + 0.5


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        self.steps += 1
        x, y, _ = batch
        return nn.functional.binary_cross_entropy_with_logits(log_odds(self(x), y), y.float().reshape(-1))

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(labels_per_sample=1, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).float()
    if labels_per_sample > 1:
        y = y[:, None].repeat(1, labels_per_sample)
    return TensorDataset(x, y, torch.arange(n) % 4)


def _fit(tmp_path, cb, train, module=None):
    module = module or Net()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(train, batch_size=16, shuffle=True),
                    DataLoader(_data(seed=1, n=32), batch_size=16))
    return module


def test_a_callable_output_without_its_gradex_loss_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"callable output.*pass loss= one of 'logistic'.*'squared'"):
        TaskAttribution(output=log_odds)
    with pytest.raises(ValueError, match="loss='cross_entropy' needs a vector"):
        TaskAttribution(output=log_odds, loss="cross_entropy")


def test_labels_a_callable_output_cannot_pair_with_fail_before_the_first_step(tmp_path):
    cb = TaskAttribution(output=log_odds, loss="logistic", n_subsets=20, progress=False, dirpath=str(tmp_path / "k"))
    module = Net()
    with pytest.raises(ValueError, match=r"one label per sample.*output='sequence'"):
        _fit(tmp_path, cb, _data(labels_per_sample=3), module)
    assert module.steps == 0


def test_a_callable_output_with_its_loss_trains_and_records_the_final_losses_it_is_analysed_with(tmp_path):
    cb = TaskAttribution(output=log_odds, loss="logistic", n_subsets=20, progress=False, raise_on_analysis_error=True,
                         dirpath=str(tmp_path / "k"))
    module = _fit(tmp_path, cb, _data())
    final = cb.report.config["run"]["final_losses"]
    x, y, _ = _data(seed=1, n=32).tensors
    with torch.no_grad():
        want = nn.functional.binary_cross_entropy_with_logits(log_odds(module(x), y), y).item()
    assert final["all"] == pytest.approx(want, rel=1e-5)
    assert len(cb.report.ranked("all")) == 4 and all(np.isfinite(v) for _, v in cb.report.ranked("all"))
