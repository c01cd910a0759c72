"""The callback, unchanged, on real architectures with each harvest (the default projection="auto",
the SJLT from layer hooks, the tensor sketch, the factorized projection): a transformers GPT-2
built from a config (no download) and a residual CNN with BatchNorm (the ResNet-18 building block).
Each is pretrained briefly on clean data (W0), then fine-tuned with SGD and momentum on synthetic
multi-task data with one planted harmful task (flipped labels); the report must rank that task last
for the target, below every clean task by a third of the score spread, and real retraining
(leave-one-out, two batch orders) confirms that task is the harmful one by a wide margin. The
planted effect used to be scrambled labels after a fit from a random init with Adam: outside the
linear regime, and the CNN's ranking flipped with ATEN_CPU_CAPABILITY=default.

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
    """Fine-tuned with SGD and momentum: a gentle fine-tune of a pretrained W0, the regime the
    linearization is meant for (with Adam at lr 3e-3 from a random init, the regime check fired on
    both models and the planted task's rank rested on a margin one CPU's rounding could move)."""

    def __init__(self, net, forward_fn=None, lr=1e-2):
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
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _pretrain(module, x, y, epochs, lr=3e-3):
    """W0: a brief pretraining on clean data of the same rule (what fine-tuning starts from)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(module(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    return module


def _tasks(inputs, labels, n_per_task):
    """Four tasks sharing one rule; task 3's labels are flipped (it teaches the opposite rule)."""
    t = torch.arange(N_TASKS).repeat_interleave(n_per_task)
    y = torch.where(t == HARMFUL, 1 - labels, labels)
    return TensorDataset(inputs, y, t)


# Sizes below the parameter counts, so each projection really projects (the default k x draws =
# 2,048 gives the CNN its exact gradients).
PROJECTIONS = {"auto": {}, "sjlt": {"proj_dim": 128}, "tensorsketch": {"proj_dim": 64}, "factorized": {"proj_dim": 64}}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the analysis pins it: these fits are small enough that more only adds noise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tmp_path, epochs, callbacks=()):
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                     callbacks=list(callbacks))


def _fit_and_scores(tmp_path, module, train, val, epochs, projection="factorized", used=None):
    L.seed_everything(0, verbose=False)
    cb = TaskAttribution(projection=projection, n_subsets=40, progress=False, raise_on_analysis_error=True,
                         dirpath=str(tmp_path / "ksm"), **PROJECTIONS[projection])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, epochs, [cb]).fit(module, DataLoader(train, batch_size=32, shuffle=True),
                                             DataLoader(val, batch_size=64))
    assert cb.report.config["callback"]["projection"] == projection
    assert cb.report.config["harvest"]["projector"]["kind"] == (used or projection)  # what "auto" became
    scores = dict(cb.report.ranked("all"))
    if cb.report.withheld:  # no estimator followed the run's size (issue 26): only the order is shown
        scores["withheld"] = cb.report.fit_quality["self_check"]["grade"]
    return scores


def _assert_planted_last_with_margin(scores):
    """The planted task scores below zero (removing it lowers the target loss) and every clean task
    above it by at least a third of the spread: a rank no rounding difference can flip. Where the
    self-check withheld the magnitudes (the tiny GPT-2: every estimator's all-tasks change is 0.31-0.32
    of the run's, in its direction) the order alone must put it last."""
    if scores.pop("withheld", None) == "direction only":
        assert min(scores, key=scores.get) == str(HARMFUL), scores
        return
    clean = [v for task, v in scores.items() if task != str(HARMFUL)]
    spread = max(scores.values()) - min(scores.values())
    assert scores[str(HARMFUL)] < 0, scores
    assert min(clean) - scores[str(HARMFUL)] > spread / 3, scores


def _retrained_target_losses(make_module, train, val, epochs, seeds=(0, 1)):
    """Real retraining: the target loss after fine-tuning W0 on all tasks and on all but each task."""
    val_x, val_y, _ = val.tensors
    out = {}
    for left_out in [None, *range(N_TASKS)]:
        keep = [i for i, t in enumerate(train.tensors[2].tolist()) if t != left_out]
        losses = []
        for seed in seeds:
            L.seed_everything(seed, verbose=False)
            module = make_module()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _trainer(None, epochs).fit(module, DataLoader(torch.utils.data.Subset(train, keep), batch_size=32,
                                                              shuffle=True))
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(module(val_x), val_y)))
        out[left_out] = sum(losses) / len(losses)
    return out


def _gpt2_problem():
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

    w0 = _pretrain(Classifier(net, two_way), *data(256, 7), epochs=GPT2_PRETRAIN).state_dict()
    val_x, val_y = data(64, 3)
    val = TensorDataset(val_x, val_y, torch.zeros(64, dtype=torch.long))

    def make():
        module = Classifier(transformers.GPT2LMHeadModel(cfg), two_way, lr=GPT2_LR)
        module.load_state_dict(w0)
        return module

    return make, _tasks(*data(N_TASKS * 48, 1), 48), val


class _Block(nn.Module):
    """The ResNet-18 building block: two 3x3 convolutions with BatchNorm and a residual sum."""

    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def _cnn_problem():
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), _Block(4),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 6, 6, generator=g)
        return x, (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()  # top half brighter?

    torch.manual_seed(0)
    w0 = _pretrain(Classifier(net()), *data(256, 7), epochs=10).state_dict()
    val_x, val_y = data(64, 3)
    val = TensorDataset(val_x, val_y, torch.zeros(64, dtype=torch.long))

    def make():
        module = Classifier(net())
        module.load_state_dict(w0)
        return module

    return make, _tasks(*data(N_TASKS * 48, 1), 48), val


GPT2_PRETRAIN, GPT2_LR = 10, 3e-3


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
def test_gpt2_from_a_config_ranks_the_flipped_task_last(tmp_path, projection):
    make, train, val = _gpt2_problem()
    scores = _fit_and_scores(tmp_path, make(), train, val, epochs=4, projection=projection,
                             used="tensorsketch" if projection == "auto" else None)  # Linear-like, d > 2 x 1,024
    _assert_planted_last_with_margin(scores)


@pytest.mark.parametrize("projection", ["auto", "sjlt", "factorized"])
def test_a_residual_cnn_with_batchnorm_ranks_the_flipped_task_last(tmp_path, projection):
    make, train, val = _cnn_problem()
    scores = _fit_and_scores(tmp_path, make(), train, val, epochs=4, projection=projection,
                             used="identity" if projection == "auto" else None)  # d < 2 x 1,024: exact gradients
    _assert_planted_last_with_margin(scores)


@pytest.mark.parametrize("problem", [_gpt2_problem, _cnn_problem], ids=["gpt2", "cnn"])
def test_real_retraining_confirms_the_planted_task_is_the_harmful_one(problem):
    """The ground truth behind the two tests above: leaving the flipped task out lowers the target loss
    and leaving out any clean task raises it, each by a clear margin (mean over two batch orders)."""
    make, train, val = problem()
    losses = _retrained_target_losses(make, train, val, epochs=4)
    full = losses[None]
    assert losses[HARMFUL] < full - 0.02, losses
    for task in range(N_TASKS):
        if task != HARMFUL:
            assert losses[task] > losses[HARMFUL] + 0.02, losses


# The linearized run follows the watched one on GPT-2 (effect scales 0.86-1.44) but not on the
# ResNet (benchmarks/results/resnet18_planted.json): there the report must say so, and its ranking is
# not asserted (the ResNet's scores moved 1,000-fold with ATEN_CPU_CAPABILITY=default against avx2,
# the planted task last in both by a margin of 0.005 on avx2: not a property of the method).
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
    if in_regime:  # where the report says its estimate does not follow the run, no ranking is promised
        assert result["report_ranking"][-1] == str(module.HARMFUL), result["report_ranking"]
    from lightning_ksm import AttributionReport

    report = AttributionReport.load(str(tmp_path / "ksm" / "report"))
    assert report.fit_quality.get("linear_regime", True) is in_regime
    assert any("linearized run" in w for w in report.warnings()) is not in_regime
    assert any("linearized run" in line for line in report.to_text().splitlines()[:3]) is not in_regime
