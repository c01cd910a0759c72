"""An HF transformers GPT-2 with a planted harmful task, checked against real retraining.

The callback attaches, unchanged and with its default settings, to a LightningModule around
``transformers.GPT2ForSequenceClassification`` built from a config (random init: no download).
W0 stands in for pretrained weights and is made here.

Setup (everything synthetic, seeded):

- **Sequences**: ``SEQ_LEN`` tokens; the first from the whole vocabulary, the rest from the task's
  own slice of it (its "domain").
- **W0**: the GPT-2 language model (2 layers, width 64) trained for ``pretrain_steps`` to predict,
  at the last position, the sequence's first token (a copy task over random domains); then its
  transformer goes into a sequence classifier with a fresh 2-class head.
- **Fine-tuning tasks**: K = 4 tasks of ``n_per_task`` sequences, task k's distractor tokens from
  domain k, label = "is the first token in the upper half of the vocabulary". Task 3 is the planted
  harmful task: its labels are flipped (or scrambled).
- **Target**: held-out sequences of all four domains with their true labels (the validation loader).

The steps and scores are those of ``recipes/_planted.py``. ``python -m recipes.gpt2_planted
--quick`` runs the attribution only (the test's mode); the full run writes
``benchmarks/results/gpt2_planted.json``. Needs ``transformers``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `lightning_ksm` and `recipes` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes import _planted  # noqa: E402

N_TASKS, HARMFUL = 4, 3
VOCAB, FIRST, DOMAIN = 32, 2, 7  # tokens 0-1 unused (0 is the pad id), 4 domains of 7 tokens from 2
SEQ_LEN = 8


@dataclass(frozen=True)
class RecipeConfig:
    n_per_task: int = 48
    n_target: int = 128
    pretrain_steps: int = 300
    pretrain_batch: int = 64
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    n_seeds: int = 3  # real retraining seeds
    projection: str = "auto"  # the callback's projection (its default)
    planted: str = "flipped"  # task 3's labels: "flipped" or "scrambled" (uniformly random)
    seed: int = 0  # data, W0 and the attribution run


FULL = RecipeConfig()
QUICK = FULL


def gpt2_config():
    import transformers

    return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ_LEN,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=2)


def sequences(domains: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(n, SEQ_LEN)`` tokens: a first token from the whole vocabulary, the rest from the domain."""
    n = len(domains)
    first = torch.randint(FIRST, VOCAB, (n, 1), generator=generator)
    rest = FIRST + DOMAIN * domains[:, None] + torch.randint(0, DOMAIN, (n, SEQ_LEN - 1), generator=generator)
    return torch.cat([first, rest], 1)


def true_label(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens[:, 0] >= (FIRST + VOCAB) // 2).long()


def task_data(cfg: RecipeConfig):
    """``(train, target)`` TensorDatasets of ``(tokens, label, task)``; task 3's labels are wrong."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1_000 + cfg.seed)
    tasks = torch.arange(N_TASKS).repeat_interleave(cfg.n_per_task)
    x = sequences(tasks, g)
    y = _planted.plant(true_label(x), tasks, HARMFUL, cfg.planted, g)
    tx = sequences(torch.arange(cfg.n_target) % N_TASKS, g)
    return TensorDataset(x, y, tasks), TensorDataset(tx, true_label(tx), torch.zeros(cfg.n_target, dtype=torch.long))


def make_w0(cfg: RecipeConfig) -> dict:
    """The GPT-2 LM trained on the copy pretext, its transformer in a fresh sequence classifier."""
    import transformers

    torch.manual_seed(cfg.seed)
    lm = transformers.GPT2LMHeadModel(gpt2_config())
    g = torch.Generator().manual_seed(2_000 + cfg.seed)
    opt = torch.optim.Adam(lm.parameters(), lr=1e-3)
    lm.train()
    for _ in range(cfg.pretrain_steps):
        x = sequences(torch.randint(0, N_TASKS, (cfg.pretrain_batch,), generator=g), g)
        loss = nn.functional.cross_entropy(lm(input_ids=x).logits[:, -1], x[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf = transformers.GPT2ForSequenceClassification(gpt2_config())
    clf.transformer.load_state_dict(lm.transformer.state_dict())
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


def new_model(w0: dict) -> nn.Module:
    import transformers

    net = transformers.GPT2ForSequenceClassification(gpt2_config())
    net.load_state_dict(w0)
    return net


def logits(net: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return net(input_ids=tokens).logits


def run(cfg: RecipeConfig, out_dir: str, *, retrain: bool = True, log=print) -> dict:
    """One configuration: the attribution run, then (``retrain``) the brute-force check."""
    return _planted.run(sys.modules[__name__], cfg, out_dir, retrain=retrain, log=log)


def main(argv=None) -> dict:
    import transformers as lib

    return _planted.main(sys.modules[__name__], argv, versions={lib.__name__: lib.__version__})


if __name__ == "__main__":
    main()
