"""Does the first-order model at W0 hold for a real fine-tuning run? The oracle behind the regime check.

For the planted-task recipes (``recipes/resnet18_planted.py``, ``recipes/gpt2_planted.py``): fine-tune
W0 on all tasks exactly as the attribution run does, then compare the target loss of

- ``w0``: the starting weights;
- ``real``: the fine-tuned model (what retraining gives);
- ``real_weights_w0_buffers``: the fine-tuned weights with W0's buffers (BatchNorm running
  statistics), which the linearization holds fixed;
- ``first_order``: the model linearized at W0 moved by the *real* weight change,
  ``f0 + J (W_T - W0)`` (a central difference in float64, no projection, no simulation).

When ``first_order`` is far from ``real``, no estimator built on the first-order model (GradEx, or
any projection of it) can follow the run: the regime check's warning (``docs/gradex.md``, "When the
linearization does not hold") then says what this measures. Each row also gives
``|W_T - W0| / |W0|``. Command (one thread, about 4 minutes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linearization_oracle.py

writes ``benchmarks/results/linearization_oracle.json``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import write_results  # noqa: E402

from recipes import _planted  # noqa: E402

# (recipe, overrides): the recipes' defaults, then the ResNet at smaller learning rates and with
# its BatchNorm statistics frozen during fine-tuning
ROWS = [
    ("gpt2_planted", {}),
    ("resnet18_planted", {}),
    ("resnet18_planted", {"frozen_norm": True}),
    ("resnet18_planted", {"lr": 3e-5}),
    ("resnet18_planted", {"lr": 1e-5}),
]
SEEDS = (0, 1)
EPS = 1e-4


def oracle(recipe, cfg) -> dict:
    from torch.func import functional_call

    w0 = recipe.make_w0(cfg)
    train, target = recipe.task_data(cfg)
    module = _planted.classifier(recipe, cfg, w0)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _planted.trainer(cfg.epochs, root).fit(module, _planted.train_loader(train, cfg.batch_size, cfg.seed))
    # the recipe's LightningModule: its forward gives the logits (one call for functional_call)
    net0, net_t = _planted.classifier(recipe, cfg, w0).double().eval(), module.double().eval()
    x, y, _ = target.tensors
    x = x.double() if x.is_floating_point() else x
    p0 = {k: v.detach() for k, v in net0.named_parameters()}
    b0 = dict(net0.named_buffers())
    delta = {k: v.detach() - p0[k] for k, v in net_t.named_parameters()}

    def loss(out) -> float:
        return float(torch.nn.functional.cross_entropy(out, y))

    def logits(params):
        return functional_call(net0, (params, b0), (x,))

    with torch.no_grad():
        row = {"w0": loss(net0(x)), "real": loss(net_t(x)),
               "real_weights_w0_buffers": loss(logits({k: p0[k] + delta[k] for k in p0}))}
        # J (W_T - W0) by a central difference in float64 (forward-mode AD does not cover every
        # kernel, e.g. CPU flash attention): exact to O(EPS^2)
        d_out = (logits({k: p0[k] + EPS * delta[k] for k in p0})
                 - logits({k: p0[k] - EPS * delta[k] for k in p0})) / (2 * EPS)
        row["first_order"] = loss(logits(p0) + d_out)
    row["relative_weight_change"] = float(torch.sqrt(sum((d ** 2).sum() for d in delta.values()))
                                          / torch.sqrt(sum((v ** 2).sum() for v in p0.values())))
    return row


def main() -> dict:
    rows = []
    for name, overrides in ROWS:
        recipe = importlib.import_module(f"recipes.{name}")
        for seed in SEEDS:
            cfg = dataclasses.replace(recipe.FULL, seed=seed, **overrides)
            row = {"recipe": name, "overrides": overrides, "seed": seed, "lr": cfg.lr, **oracle(recipe, cfg)}
            rows.append(row)
            print(f"{name} {overrides} seed {seed}: W0 {row['w0']:.3f} real {row['real']:.3f} "
                  f"(W0 buffers {row['real_weights_w0_buffers']:.3f}) first order {row['first_order']:.3f} "
                  f"|dW|/|W0| {row['relative_weight_change']:.4f}", flush=True)
    write_results("linearization_oracle", {"rows": rows, "seeds": list(SEEDS),
                                           "command": "OMP_NUM_THREADS=1 python benchmarks/linearization_oracle.py"})
    return {"rows": rows}


if __name__ == "__main__":
    main()
