"""output="sequence": which harvest representation of a language model's per-sample loss follows
real fine-tuning best (docs/gradex.md, "Language models").

A tiny character-level GPT2LMHeadModel (tests/lm_problem.py), briefly pretrained (W0), fine-tuned
with AdamW on four text-to-text sources (one with random answers). At checkpoints W_t of the real
run, each sample's real mean answer-token loss L_i(W_t) is compared with what three exact
(unprojected) linearizations at W0 predict for the real displacement W_t - W0:

- sample:  one row per sample, the margin m_i = -log(expm1(L_i)) linearized, loss softplus(-m_i)
           (what output="sequence" stores);
- token:   one row per supervised token, each token's margin linearized, the sample's loss the mean
           of the tokens' softplus(-m_t) (memory: tokens per sample times larger);
- linear:  L_i(W0) + <grad L_i, W_t - W0> (the loss itself as the output, unbounded below).

Writes benchmarks/results/sequence_fidelity.json. Run: python benchmarks/sequence_fidelity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_results  # noqa: E402
from lm_problem import answer_loss, collate, loader, pretrain, samples, source_data, tiny_gpt2  # noqa: E402

from lightning_ksm.harvesting.batches import BatchReader  # noqa: E402
from lightning_ksm.harvesting.harvest import harvest  # noqa: E402
from lightning_ksm.harvesting.params import projector_for_model  # noqa: E402

ANSWER = 6
CHECKPOINTS = (2, 5, 10, 20, 40, 80)


def per_token_copies(data):
    """One copy of each sample per supervised token, with only that token's label (and its owner)."""
    out, owner = [], []
    for i, s in enumerate(data):
        for t in torch.nonzero(s["labels"] != -100).flatten():
            labels = torch.full_like(s["labels"], -100)
            labels[t] = s["labels"][t]
            out.append({**s, "labels": labels})
            owner.append(i)
    return out, np.array(owner)


def features(model, data):
    reader = BatchReader(task_key="task")
    batches = [reader.read(b) for b in loader(data, 16)]
    proj = projector_for_model(model, "identity", None)
    f = harvest(model, batches, projector=proj, mode="sequence")
    return f.outputs.astype(np.float64), f.jacobians.astype(np.float64)


def real_losses(model, data):
    with torch.no_grad():
        b = collate(data)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return answer_loss(out.logits, b["labels"]).double().numpy()


def softplus(x):
    return np.logaddexp(0.0, x)


def main(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = pretrain(tiny_gpt2(seed), steps=150, seed=seed)
    train = [s for k, t in enumerate("abc") for s in samples(t, 24, seed + k, answer=ANSWER)]
    train += samples("noise", 24, seed + 10, noise=True, answer=ANSWER)
    evaluate = samples("a", 32, seed + 50, answer=ANSWER) + samples("noise", 16, seed + 60, noise=True, answer=ANSWER)
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    m, J = features(model, evaluate)
    copies, owner = per_token_copies(evaluate)
    mt, Jt = features(model, copies)
    L0 = real_losses(model, evaluate)
    g = (1.0 / (1.0 + np.exp(m)) * -1.0)[:, None] * J  # d softplus(-m) / dW

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step, rows = 0, []
    batches = loader(train, batch_size=8, shuffle=True)
    while step < CHECKPOINTS[-1]:
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = answer_loss(out.logits, batch["labels"]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in CHECKPOINTS:
                delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy() - w0
                real = real_losses(model, evaluate) - L0
                token = np.bincount(owner, softplus(-(mt + Jt @ delta))) / np.bincount(owner)
                preds = {"sample": softplus(-(m + J @ delta)) - L0, "token": token - L0, "linear": g @ delta}
                row = {"step": step, "real_mean_change": float(real.mean())}
                for name, p in preds.items():
                    row[name] = {
                        "pearson": float(np.corrcoef(p, real)[0, 1]),
                        "relative_error": float(np.linalg.norm(p - real) / np.linalg.norm(real)),
                        "mean_change": float(p.mean()),
                        "rule_group_change": float(p[:32].mean()), "noise_group_change": float(p[32:].mean()),
                    }
                row["real_rule_group_change"] = float(real[:32].mean())
                row["real_noise_group_change"] = float(real[32:].mean())
                rows.append(row)
                print(step, {k: (round(v["pearson"], 3), round(v["relative_error"], 3))
                             for k, v in row.items() if isinstance(v, dict)}, round(row["real_mean_change"], 4))
            if step == CHECKPOINTS[-1]:
                break
    payload = {"answer_tokens": ANSWER, "parameters": len(w0), "n_eval": len(evaluate), "param_names": len(names),
               "rows_per_sample": {"sample": 1, "token": len(copies) / len(evaluate), "linear": 1},
               "checkpoints": rows}
    write_results("sequence_fidelity", payload)
    return payload


if __name__ == "__main__":
    main()
