"""A tiny text-to-text problem for the language-model tests: a character-level
``transformers.GPT2LMHeadModel`` from a config (no download), Hugging Face-style dict batches
(``input_ids``, ``attention_mask``, ``labels`` with -100 on prompt and padding, ``task``) padded per
batch, and a LightningModule whose training loss is the mean over the answer tokens.

Tokens: 0 padding, 1 separator, 2..15 symbols. Every source task maps a prompt of 2-5 symbols to the
answer ``(first + second + j) mod 14`` for j < ``ANSWER`` (the rule the target needs);
task ``"noise"`` answers random tokens (the planted harmful task).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import lightning.pytorch as L

VOCAB, PAD, SEP, ANSWER = 16, 0, 1, 2


def tiny_gpt2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg)


def samples(task, n: int, seed: int, noise: bool = False, answer: int = ANSWER) -> list:
    """``n`` samples ``{"input_ids", "labels", "task"}`` of one task, prompts of random length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        value = int(prompt[0] + prompt[1]) + torch.arange(answer)
        if noise:
            value = torch.randint(0, 14, (answer,), generator=g)
        ids = torch.cat([prompt, torch.tensor([SEP]), value % 14 + 2])
        labels = ids.clone()
        labels[: len(prompt) + 1] = -100  # no loss on the prompt and the separator
        out.append({"input_ids": ids, "labels": labels, "task": task})
    return out


def collate(items: list) -> dict:
    """Pad to the longest sample of the batch: input_ids PAD, attention_mask 0, labels -100."""
    T = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), T), PAD)
    labels = torch.full((len(items), T), -100)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for r, item in enumerate(items):
        n = len(item["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = item["input_ids"], item["labels"], 1
    tasks = [i["task"] for i in items]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "task": torch.tensor(tasks) if isinstance(tasks[0], int) else tasks}


def source_data(n_per_task: int = 24, seed: int = 0) -> list:
    tasks = ["a", "b", "c"]
    data = [s for k, t in enumerate(tasks) for s in samples(t, n_per_task, seed + k)]
    return data + samples("noise", n_per_task, seed + 10, noise=True)


def loader(data: list, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean cross-entropy over the answer tokens (causal shift, -100 ignored)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return token.sum(1) / (labels != -100).sum(1)


def pretrain(model, steps: int = 150, seed: int = 0):
    """A brief pretraining on the rule, so that W0 is a pretrained model."""
    data = [s for k in range(3) for s in samples("p", 32, seed + 100 + k)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = loader(data, batch_size=16, shuffle=True)
    done = 0
    while done < steps:
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = answer_loss(out.logits, batch["labels"]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model


class LitLM(L.LightningModule):
    """The user's module: called with the batch's model inputs as keywords, AdamW, answer-token loss."""

    def __init__(self, model, lr: float = 3e-3):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        out = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return answer_loss(out.logits, batch["labels"]).mean()

    def validation_step(self, batch, batch_idx):
        out = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        self.log("val_loss", answer_loss(out.logits, batch["labels"]).mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
