"""Harvest throughput against the machine's own limit, in one run (issue: real models at real speed).

For each model, over the same batch (same batch size, one torch thread everywhere):

- ``plain``: an ordinary training step's forward + backward of the mean loss (the machine's limit:
  no harvest can be cheaper than one backward pass);
- ``hooks``: the callback's default harvest: SJLT k = 1024 x 2 draws of the exact per-sample
  gradients, formed layer by layer from hooks on one batched backward pass
  (``grad_engine="hooks"``, ``lightning_ksm.harvesting.layerwise``);
- ``tensorsketch``: the tensor sketch at the same size and draws through the same hooks, formed from
  the two sides of each outer product (no per-sample weight gradient; ``harvesting/tensorsketch.py``);
- ``per_sample``: the same projection of the same gradients from ``torch.func`` per-sample
  gradients (``grad_engine="vmap"``; the previous default path): the features are equal;
- ``factorized``: ``harvest(projection="factorized")`` (k = 256 per parameter, one draw): the
  Kronecker projection of both sides of each layer's outer products (opt-in: less faithful, see
  docs/gradex.md).

Models: the modular-arithmetic recipe's transformer (0.4M parameters; its free position
parameter is excluded from the factorized run, which would otherwise send it through the exact
per-sample fallback), a GPT-2-style ``transformers`` model built from a config (>= 10M parameters,
random init), and a ResNet-18-shaped CNN (11M parameters; written here: torchvision's wheel does
not install beside the project's torch pin on this machine). The paths of one model are timed
interleaved in one process (a shared machine loads them alike); peak memory (max RSS) is measured
for each path alone in a fresh process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harvest_throughput.py [--quick]

writes ``benchmarks/results/harvest_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ("modular_transformer", "gpt2_small", "resnet18")
_SESSIONS: list = []
PATHS = ("plain", "hooks", "tensorsketch", "per_sample", "factorized")


def build(name: str):
    """(model, batch inputs, labels, forward_fn, exclude) for one model, seeded."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "modular_transformer":
        from recipes.modular_arithmetic import ModularTransformer

        model = ModularTransformer(97)
        x = torch.randint(0, 99, (64, 4))
        return model, x, torch.randint(0, 97, (64,)), None, ["pos"]
    if name == "gpt2_small":
        import transformers

        cfg = transformers.GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=8000, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)

        def last_logits(m, tokens):
            return m(input_ids=tokens).logits[:, -1, :10]  # a 10-way classifier at the last position

        return model, torch.randint(0, 8000, (16, 32)), torch.randint(0, 10, (16,)), last_logits, None
    if name == "resnet18":
        return _resnet18(), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), None, None
    raise ValueError(name)


def _resnet18():
    from torch import nn

    def block(cin, cout, stride):
        class Basic(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
                self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
                self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                h = self.b2(self.c2(nn.functional.relu(self.b1(self.c1(x)))))
                return nn.functional.relu(h + self.skip(x))

        return Basic()

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def _step(name: str, path: str):
    """``(step, model, batch size)``: one batch of ``path`` on model ``name``, set up once."""
    import torch

    from lightning_ksm.harvesting import Harvester, projector_for_model

    model, x, y, forward_fn, exclude = build(name)
    n = len(y)
    if path == "plain":
        model.train()

        def step():
            out = forward_fn(model, x) if forward_fn else model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            model.zero_grad(set_to_none=True)

        return step, model, n
    if path == "factorized":
        proj = projector_for_model(model, "factorized", 256, seed=0, exclude=exclude)
    else:  # the callback's default size: HarvestConfig's proj_dim x proj_draws
        from lightning_ksm.config import HarvestConfig

        cfg = HarvestConfig()
        kind = "tensorsketch" if path == "tensorsketch" else "sjlt"
        proj = projector_for_model(model, kind, cfg.proj_dim, seed=0, draws=cfg.proj_draws)
    # Set up once per harvest, as HarvestRunner does; the per-batch cost is what is timed.
    harvester = Harvester(model, projector=proj, forward_fn=forward_fn, chunk_size=8 if path == "per_sample" else n,
                          grad_engine="vmap" if path == "per_sample" else "hooks")
    session = harvester.session()  # eval mode etc. for the rest of this process (kept referenced:
    session.__enter__()            # a collected session would restore train mode)
    _SESSIONS.append(session)
    return (lambda: harvester.batch((x, y, [0] * n))), model, n


def _default_path(name: str) -> str:
    """The path the callback's default (``projection="auto"``) takes on model ``name``."""
    from lightning_ksm.config import HarvestConfig
    from lightning_ksm.harvesting.params import resolve_projection, select_parameters

    model = build(name)[0]
    kind = resolve_projection(model, select_parameters(model), HarvestConfig())
    # the factorized row runs at 256 per parameter; auto's factorized projection takes proj_dim (1024)
    return {"tensorsketch": "tensorsketch", "sjlt": "hooks", "factorized": "factorized"}[kind]


def measure_memory(name: str, path: str) -> dict:
    """Max RSS of one batch of ``path`` (run alone in a fresh process)."""
    import torch

    torch.set_num_threads(1)
    step, _, _ = _step(name, path)
    step()
    return {"model": name, "path": path, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_speed(name: str, repeats: int) -> list:
    """Samples/s of every path on model ``name``, interleaved round by round (the machine is shared:
    interleaving exposes all paths to the same load), best round per path."""
    import torch

    torch.set_num_threads(1)
    steps = {path: _step(name, path) for path in PATHS}
    for step, _, _ in steps.values():
        step()  # warm-up (projection blocks, allocator)
    best = dict.fromkeys(PATHS, float("inf"))
    for _ in range(repeats):
        for path, (step, _, _) in steps.items():
            start = time.perf_counter()
            step()
            best[path] = min(best[path], time.perf_counter() - start)
    return [{"model": name, "path": path, "batch": steps[path][2], "seconds_per_batch": best[path],
             "samples_per_s": steps[path][2] / best[path],
             "params": sum(p.numel() for p in steps[path][1].parameters())} for path in PATHS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per measurement")
    parser.add_argument("--memory", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--speed", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    if args.memory:
        print(json.dumps(measure_memory(*args.memory)))
        return
    if args.speed:
        print(json.dumps(measure_speed(args.speed, repeats)))
        return
    from _common import write_results

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    def run(*extra):
        cmd = [sys.executable, __file__, *extra] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    for name in MODELS:
        speed = run("--speed", name)
        if isinstance(speed, dict):  # the model could not be built or run
            rows += [{"model": name, "path": path, **speed} for path in PATHS]
            continue
        for row in speed:
            row.update({k: v for k, v in run("--memory", name, row["path"]).items() if k not in ("model", "path")})
            rows.append(row)
            print(row, flush=True)
    ratios = {}
    for name in MODELS:
        by = {r["path"]: r for r in rows if r["model"] == name and "samples_per_s" in r}
        if set(PATHS) <= set(by):
            speed = {p: by[p]["samples_per_s"] for p in PATHS}
            default = _default_path(name)
            ratios[name] = {
                "default_path": default,
                "default_vs_plain": speed[default] / speed["plain"],
                "default_vs_per_sample": speed[default] / speed["per_sample"],
                "hooks_vs_plain": speed["hooks"] / speed["plain"],
                "hooks_vs_per_sample": speed["hooks"] / speed["per_sample"],
                "tensorsketch_vs_plain": speed["tensorsketch"] / speed["plain"],
                "tensorsketch_vs_per_sample": speed["tensorsketch"] / speed["per_sample"],
                "factorized_vs_plain": speed["factorized"] / speed["plain"],
                "factorized_vs_per_sample": speed["factorized"] / speed["per_sample"],
            }
    write_results("harvest_throughput", {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harvest_throughput.py" + (" --quick" if args.quick else ""),
        "threads": 1,
        "targets": {"default_vs_plain": ">= 0.5", "default_vs_per_sample (gpt2_small)": ">= 10"},
        "notes": ["margin output; hooks and per_sample: SJLT k = 1024 x 2 draws (equal features); "
                  "tensorsketch: k = 1024 x 2 draws; factorized: k = 256 per parameter, one draw; "
                  "default_path: the path of the callback's default (projection='auto')",
                  "timing: the five paths of a model interleaved round by round in one process (the "
                  "machine is shared), best of 3 rounds after a warm-up; memory: max RSS of one batch of "
                  "each path alone in a fresh process"],
        "rows": rows,
        "ratios": ratios,
    })


if __name__ == "__main__":
    main()
