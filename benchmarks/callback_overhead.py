"""What the callback adds to a fit: wall time of the same seeded fit with and without
``TaskAttribution``, with the callback's stages split out (harvest, GradEx, surrogate, readouts).

Two projects, each fitted alternately without and with the callback (the machine is shared:
alternating exposes both to the same load), best of ``--repeats`` per arm:

- ``mlp_1m``: a 1.3M-parameter MLP, 8 source tasks, 5 epochs (targets: <= 1.15x);
- ``small``: a 2.4k-parameter MLP, 6 tasks, 5 epochs (target: fixed costs <= 3 s).

The callback runs with the default harvest (``projection="auto"``, 1024 x 2 draws: the tensor sketch
on these Linear-only models, formed from both sides of each outer product), with
``projection="sjlt"`` (the default before: exact per-sample layer gradients from layer hooks, same
size) and with ``projection="factorized"`` (256 per parameter, one draw).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/callback_overhead.py [--repeats N]

writes ``benchmarks/results/callback_overhead.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROJECTS = {
    "mlp_1m": {"dim": 256, "hidden": 1024, "layers": 2, "tasks": 8, "per_task": 256, "epochs": 5},
    "small": {"dim": 16, "hidden": 128, "layers": 1, "tasks": 6, "per_task": 128, "epochs": 5},
}
ARMS = ("none", "default", "sjlt", "factorized")


def _project(spec: dict, seed: int = 0):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning.pytorch as L

    g = torch.Generator().manual_seed(seed)
    K, n, d = spec["tasks"], spec["per_task"], spec["dim"]
    W = torch.randn(K, d, generator=g)
    W[1:] = W[0] + 0.5 * W[1:]

    def split(m):
        X = torch.randn(K * m, d, generator=g)
        t = torch.arange(K).repeat_interleave(m)
        return TensorDataset(X, ((X * W[t]).sum(1) > 0).long(), t)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            layers, width = [], d
            for _ in range(spec["layers"]):
                layers += [nn.Linear(width, spec["hidden"]), nn.Tanh()]
                width = spec["hidden"]
            self.net = nn.Sequential(*layers, nn.Linear(width, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    train, val = split(n), split(n // 4)
    return Net, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


def fit(spec: dict, arm: str) -> dict:
    import lightning.pytorch as L

    from lightning_ksm import TaskAttribution

    Net, train, val = _project(spec)
    L.seed_everything(0, verbose=False)
    model = Net()
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = []
        if arm != "none":
            extra = {"factorized": {"projection": "factorized", "proj_dim": 256},
                     "sjlt": {"projection": "sjlt"}}.get(arm, {})
            callbacks.append(TaskAttribution(progress=False, dirpath=f"{tmp}/ksm", raise_on_analysis_error=True, **extra))
        trainer = L.Trainer(max_epochs=spec["epochs"], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            default_root_dir=tmp, callbacks=callbacks)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train, val)
        wall = time.perf_counter() - start
        stages = dict(callbacks[0].report.timings) if callbacks else {}
        used = callbacks[0].report.config["harvest"]["projector"]["kind"] if callbacks else None
    return {"wall_s": wall, "stages_s": stages, "params": sum(p.numel() for p in model.parameters()),
            "projection_used": used}


def main() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    from _common import write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with threadpool_limits(limits=1):
        for name, spec in PROJECTS.items():
            best = {}
            for _ in range(args.repeats):
                for arm in ARMS:
                    row = fit(spec, arm)
                    if arm not in best or row["wall_s"] < best[arm]["wall_s"]:
                        best[arm] = row
                    print(name, arm, row, flush=True)
            base = best["none"]["wall_s"]
            results[name] = {
                "spec": spec, "params": best["none"]["params"], "arms": best,
                "ratio_default": best["default"]["wall_s"] / base,
                "ratio_factorized": best["factorized"]["wall_s"] / base,
                "ratio_sjlt": best["sjlt"]["wall_s"] / base,
                "fixed_cost_sjlt_s": best["sjlt"]["wall_s"] - base,
                "fixed_cost_default_s": best["default"]["wall_s"] - base,
                "fixed_cost_factorized_s": best["factorized"]["wall_s"] - base,
            }
    write_results("callback_overhead", {
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/callback_overhead.py --repeats {args.repeats}",
        "threads": 1,
        "targets": {"mlp_1m ratio": "<= 1.15", "small fixed cost": "<= 3 s"},
        "results": results,
    })


if __name__ == "__main__":
    main()
