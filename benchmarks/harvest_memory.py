"""The harvest's memory and time against a plain training step on GPT-2 classifiers (issue: real runs
at real size), in one run, one torch thread.

Models (``transformers.GPT2ForSequenceClassification`` from a config, random init, no download):

- ``gpt2_4x256``: 4 layers, width 256, a 8,192-token vocabulary (5.3M parameters), batch 32 x 64 tokens;
- ``gpt2_vocab50257``: 1 layer, width 32, GPT-2's real 50,257-token vocabulary (1.6M parameters),
  batch 16 x 16 tokens (the harvest used to die here: the sum check sketched ``eye(50,257)``).

Paths, each over the same batch:

- ``plain``: forward + backward of the mean cross-entropy (what a training step costs, less the
  optimizer);
- ``harvest``: a ``Harvester`` (as the runner keeps one per harvest) with the callback's default projection for the model (``projection="auto"``:
  the tensor sketch, ``proj_dim`` 1,024 x 2 draws) through the layer hooks, margin outputs.

Peak memory is the max RSS of a fresh process that builds the model and runs the path three times,
minus the max RSS after building the model (``extra_rss_mb``); time is the median of three calls
after one warm-up, each path in its own process, interleaved twice. Ratios: harvest / plain.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harvest_memory.py

writes ``benchmarks/results/harvest_memory.json``.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

MODELS = {
    "gpt2_4x256": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=64, batch=32, tokens=64),
    "gpt2_vocab50257": dict(n_layer=1, n_embd=32, n_head=2, vocab_size=50257, n_positions=16, batch=16, tokens=16),
}


def child(model_name: str, path: str) -> dict:
    import warnings

    import torch
    import transformers
    from torch import nn

    from lightning_ksm.harvesting import Harvester
    from lightning_ksm.config import HarvestConfig
    from lightning_ksm.harvesting.params import projector_for_model, resolve_projection

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    batch, tokens = spec.pop("batch"), spec.pop("tokens")
    cfg = transformers.GPT2Config(num_labels=2, pad_token_id=0, **spec)
    net = transformers.GPT2ForSequenceClassification(cfg)
    x = torch.randint(1, cfg.vocab_size, (batch, tokens))
    y = torch.randint(0, 2, (batch,))

    def forward(m, t):
        return m(input_ids=t).logits

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path == "plain":
        def run():
            net.zero_grad()
            nn.functional.cross_entropy(forward(net, x), y).backward()
        kind = None
    else:
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        kind = resolve_projection(net, names, HarvestConfig())
        proj = projector_for_model(net, kind, 1024, seed=0, draws=2)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            harvester = Harvester(net, projector=proj, forward_fn=forward, mode="margin", chunk_size=batch)

        def run():  # one harvester for the whole harvest, as the runner keeps it (its first chunk is checked)
            with warnings.catch_warnings(), harvester.session():
                warnings.simplefilter("ignore")
                harvester.batch((x, y, [0] * batch), 0)
    run()  # warm-up, and the harvest's one-off check of the hook sums on its first chunk
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "extra_rss_mb": (peak - base) / 1024, "peak_rss_mb": peak / 1024,
            "projection": kind, "n_params": sum(p.numel() for p in net.parameters())}


def measure(model_name: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", model_name, path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(models, out: str) -> None:
    rows = {}
    for model_name in models:
        runs = {"plain": [], "harvest": []}
        for _ in range(2):  # interleaved: a shared machine loads both paths alike
            for path in runs:
                runs[path].append(measure(model_name, path))
        plain = {k: min(r[k] for r in runs["plain"]) for k in ("seconds", "extra_rss_mb", "peak_rss_mb")}
        harvest = {k: min(r[k] for r in runs["harvest"]) for k in ("seconds", "extra_rss_mb", "peak_rss_mb")}
        rows[model_name] = {
            "spec": MODELS[model_name], "n_params": runs["plain"][0]["n_params"],
            "projection": runs["harvest"][0]["projection"], "plain": plain, "harvest": harvest,
            "time_ratio": harvest["seconds"] / plain["seconds"],
            "extra_memory_ratio": harvest["extra_rss_mb"] / max(plain["extra_rss_mb"], 1e-9),
        }
        print(model_name, json.dumps(rows[model_name]), flush=True)
    write_results(out, {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harvest_memory.py",
        "what": "harvest() with the default projection (auto: tensor sketch, 1,024 x 2 draws) against a plain "
                "forward+backward over the same batch; time: median of 3 after a warm-up, the faster of 2 "
                "interleaved processes; memory: max RSS minus the RSS after building the model, fresh process",
        "models": rows,
    })


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
        parser.add_argument("--out", default="harvest_memory", help="results file name (benchmarks/results/OUT.json)")
        args = parser.parse_args()
        main(args.models, args.out)
