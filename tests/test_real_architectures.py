"""The callback, unchanged, on real architectures with each harvest (the default projection="auto",
the SJLT from layer hooks, the tensor sketch, the factorized projection): a transformers GPT-2
built from a config (random init, no download) and a residual CNN with BatchNorm (the ResNet-18
building block). Each is trained on synthetic multi-task data with one planted harmful task
(scrambled labels), and the report must rank that task last for the target.

Then the recipes at their real sizes, with the callback at its defaults: torchvision's own
ResNet-18 (11.2M parameters) and transformers' GPT2ForSequenceClassification, each fine-tuned from
a pretext-trained W0 with a planted task of flipped labels. Real retraining of every subset
(``benchmarks/results/{resnet18,gpt2}_planted.json``) shows that task is the most harmful there."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L

from lightning_ksm import TaskAttribution

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N_TASKS, HARMFUL = 4, 3


class Classifier(L.LightningModule):
    def __init__(self, net, forward_fn=None, lr=3e-3):
        super().__init__()
        self.net, self.forward_fn, self.lr = net, forward_fn, lr

    def forward(self, x):
        return self.forward_fn(self.net, x) if self.forward_fn else self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _tasks(inputs, labels, n_per_task, seed):
    """Four tasks sharing one rule; task 3's labels are scrambled."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(N_TASKS).repeat_interleave(n_per_task)
    y = labels.clone()
    bad = t == HARMFUL
    y[bad] = torch.randint(0, 2, (int(bad.sum()),), generator=g)
    return TensorDataset(inputs, y, t)


# Sizes below the parameter counts (386 and 3,632), so each projection really projects (the default
# k x draws = 2,048 gives the CNN its exact gradients). The SJLT of the CNN at k = 64 ranked the
# planted task third (seen once); 96-192 rank it last.
PROJECTIONS = {"auto": {}, "sjlt": {"proj_dim": 128}, "tensorsketch": {"proj_dim": 64}, "factorized": {"proj_dim": 64}}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these small fits' rankings otherwise depend on the reduction order of the
    machine's thread count (the residual CNN's planted task ranked third with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit_and_rank(tmp_path, module, train, val, epochs, projection="factorized", used=None):
    L.seed_everything(0, verbose=False)
    cb = TaskAttribution(projection=projection, n_subsets=40, progress=False, raise_on_analysis_error=True,
                         dirpath=str(tmp_path / "ksm"), **PROJECTIONS[projection])
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=64))
    assert cb.report.config["callback"]["projection"] == projection
    assert cb.report.config["harvest"]["projector"]["kind"] == (used or projection)  # what "auto" became
    return [task for task, _ in cb.report.ranked("all")]


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
def test_gpt2_from_a_config_ranks_the_scrambled_task_last(tmp_path, projection):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=12, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)
    net = transformers.GPT2LMHeadModel(cfg)

    def two_way(m, tokens):
        return m(input_ids=tokens).logits[:, -1, :2]

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(2, 12, (n, 6), generator=g)
        return tokens, (tokens[:, 0] > 6).long()  # the rule: is the first token large?

    train = _tasks(*data(N_TASKS * 48, 1), 48, seed=2)
    val_x, val_y = data(64, 3)
    val = TensorDataset(val_x, val_y, torch.zeros(64, dtype=torch.long))
    ranked = _fit_and_rank(tmp_path, Classifier(net, two_way), train, val, epochs=4, projection=projection,
                           used="tensorsketch" if projection == "auto" else None)  # Linear-like, d > 2 x 1,024
    assert ranked[-1] == str(HARMFUL), ranked


@pytest.mark.parametrize("projection", ["auto", "sjlt", "factorized"])
def test_a_residual_cnn_with_batchnorm_ranks_the_scrambled_task_last(tmp_path, projection):
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), Block(4),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 6, 6, generator=g)
        return x, (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()  # top half brighter?

    train = _tasks(*data(N_TASKS * 48, 1), 48, seed=2)
    val_x, val_y = data(64, 3)
    val = TensorDataset(val_x, val_y, torch.zeros(64, dtype=torch.long))
    ranked = _fit_and_rank(tmp_path, Classifier(net), train, val, epochs=4, projection=projection,
                           used="identity" if projection == "auto" else None)  # d < 2 x 1,024: exact gradients
    assert ranked[-1] == str(HARMFUL), ranked


# The linearized run follows the watched one on GPT-2 (effect scales 0.86-1.44) but not on the
# ResNet (benchmarks/results/resnet18_planted.json): there the report must say so.
@pytest.mark.parametrize("recipe, library, projection, in_regime", [
    ("resnet18_planted", "torchvision", "factorized", False), ("gpt2_planted", "transformers", "tensorsketch", True)])
def test_the_real_size_recipes_rank_the_planted_task_last(tmp_path, recipe, library, projection, in_regime):
    pytest.importorskip(library)
    import importlib
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(f"recipes.{recipe}")
    result = module.run(module.QUICK, str(tmp_path), retrain=False, log=lambda *a: None)
    assert result["projection"] == projection  # what "auto" became: factorized for convolutions, sketch for GPT-2
    assert result["report_ranking"][-1] == str(module.HARMFUL), result["report_ranking"]
    from lightning_ksm import AttributionReport

    report = AttributionReport.load(str(tmp_path / "ksm" / "report"))
    assert report.fit_quality.get("linear_regime", True) is in_regime
    assert any("linearized run" in w for w in report.warnings()) is not in_regime
    assert any("linearized run" in line for line in report.to_text().splitlines()[:3]) is not in_regime
