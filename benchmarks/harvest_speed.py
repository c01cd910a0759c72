"""Harvest throughput and peak memory: dense Gaussian vs SJLT projection, on the modular-arithmetic model.

The model is the setting's 2-layer decoder-only transformer (d_model 128, 4 heads, MLP 512,
vocab 100, 4 input tokens, ~423k parameters; hand-written attention so that torch.func.vmap works).
Each configuration runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own:

- ``grads_only``: per-sample gradients with a projector that discards them (the floor: no projection);
- ``gaussian``: dense Gaussian, default 256 MiB block cache, the rest regenerated per chunk
  (the ratio baseline);
- ``gaussian_cached``: dense Gaussian with a cache large enough for the whole d x k matrix;
- ``sjlt``: sparse sign sketch, s = 4.

All at k = 512, mode "margin", chunk_size 256. Throughput is measured after a one-batch warm-up
(which fills the caches); the warm-up time is reported too. A second part measures projection
accuracy on 64 exact per-sample gradients: the relative Frobenius error of the projected Gram matrix
and the spread of projected/true norms, for k in {128, 512, 2048}.

Run: ``.venv/bin/python benchmarks/harvest_speed.py`` (about 2-3 minutes on 2 CPU cores);
writes ``benchmarks/results/harvest_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lightning_ksm.harvest import exact_gradients, harvest, projector_for_model  # noqa: E402
from lightning_ksm.projection import Projector, make_projector  # noqa: E402

P = 97  # modulus; tokens 0..96 are numbers, 97 is the operator, 98 is "=", 99 unused
VOCAB, D_MODEL, N_HEADS, D_MLP, N_LAYERS, SEQ = 100, 128, 4, 512, 2, 4


class Block(nn.Module):
    """Pre-LN decoder block with causal multi-head attention written out (vmap-friendly)."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, D_MLP), nn.GELU(), nn.Linear(D_MLP, D_MODEL))
        self.register_buffer("mask", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)))

    def forward(self, h):
        b, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(D_MODEL, dim=-1)
        q, k, v = (z.reshape(b, t, N_HEADS, D_MODEL // N_HEADS).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D_MODEL // N_HEADS)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        h = h + self.out((att @ v).transpose(1, 2).reshape(b, t, D_MODEL))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Token + position embeddings, two decoder blocks, final LayerNorm, logits of the last token."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h[:, -1]))


def make_data(n: int, seed: int = 0):
    """Random modular-addition problems ``a + b = ?`` as 4 tokens, label (a + b) mod P."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, P, (n,), generator=g)
    b = torch.randint(0, P, (n,), generator=g)
    tokens = torch.stack([a, torch.full_like(a, P), b, torch.full_like(a, P + 1)], dim=1)
    return tokens, (a + b) % P


class DiscardProjector(Projector):
    """Validates and drops the gradients (returns zeros): the cost of per-sample gradients alone."""

    kind = "discard"

    def project(self, grads):
        lead, rows, dtype, device = self._check_grads(grads)
        return torch.zeros(*lead, self.k, dtype=dtype, device=device)


def build_projector(config: str, model: nn.Module, k: int) -> Projector:
    if config == "grads_only":
        return DiscardProjector({n: p.shape for n, p in model.named_parameters()}, k)
    if config == "gaussian":
        return projector_for_model(model, "gaussian", k, seed=0)
    if config == "gaussian_cached":
        return projector_for_model(model, "gaussian", k, seed=0, cache_bytes=4 * 2**30)
    if config == "sjlt":
        return projector_for_model(model, "sjlt", k, seed=0, s=4)
    raise ValueError(config)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_speed(config: str, n: int, k: int, batch: int, chunk: int) -> dict:
    """One configuration (called in a child process)."""
    torch.manual_seed(0)
    model = Transformer()
    tokens, labels = make_data(n + batch, seed=1)
    proj = build_projector(config, model, k)
    batches = [(tokens[s: s + batch], labels[s: s + batch], [0] * batch) for s in range(0, n + batch, batch)]
    rss_before = rss_mb()
    t0 = time.perf_counter()
    harvest(model, batches[:1], projector=proj, chunk_size=chunk)  # warm-up: fills caches
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = harvest(model, batches[1:], projector=proj, chunk_size=chunk)
    elapsed = time.perf_counter() - t0
    assert feats.jacobians.shape == (n, k)
    return {
        "config": config,
        "n_params": sum(p.numel() for p in model.parameters()),
        "samples": n,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(n / elapsed, 1),
        "warmup_batch_s": round(warmup_s, 3),
        "rss_before_harvest_mb": round(rss_before, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def run_accuracy(n: int, ks: list[int]) -> dict:
    """Gram-matrix and norm errors of projections of exact per-sample gradients (child process)."""
    torch.manual_seed(0)
    model = Transformer()
    tokens, labels = make_data(n, seed=2)
    _, exact = exact_gradients(model, tokens, labels, mode="margin", chunk_size=32)
    g = torch.tensor(exact)
    gram = g @ g.T
    shapes = {name: p.shape for name, p in model.named_parameters()}
    rows = []
    for kind in ("gaussian", "sjlt"):
        for k in ks:
            t0 = time.perf_counter()
            proj = make_projector(kind, shapes, k, seed=0, cache_bytes=0)
            pg = proj.project_flat(g)
            secs = time.perf_counter() - t0
            pgram = pg @ pg.T
            ratio = (pg.norm(dim=1) / g.norm(dim=1)).numpy()
            rows.append({
                "kind": kind,
                "k": k,
                "gram_rel_fro_error": round(float((pgram - gram).norm() / gram.norm()), 4),
                "norm_ratio_mean": round(float(ratio.mean()), 4),
                "norm_ratio_std": round(float(ratio.std()), 4),
                "expected_std_about": round(math.sqrt(2 / k), 4),
                "project_seconds": round(secs, 3),
            })
    return {"n_samples": n, "d": int(g.shape[1]), "results": rows}


def child(args) -> None:
    if args.child == "accuracy":
        out = run_accuracy(args.acc_n, [128, 512, 2048])
    else:
        out = run_speed(args.child, args.n, args.k, args.batch, args.chunk)
    print("RESULT " + json.dumps(out))


def spawn(extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + extra
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{res.stderr[-3000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="samples timed per configuration")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--acc-n", type=int, default=64)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "harvest_speed.json"))
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    common = ["--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch), "--chunk", str(args.chunk)]
    t_start = time.perf_counter()
    speed = []
    for config in ("grads_only", "gaussian", "gaussian_cached", "sjlt"):
        r = spawn(["--child", config] + common)
        print(json.dumps(r), flush=True)
        speed.append(r)
    base = next(r for r in speed if r["config"] == "gaussian")
    for r in speed:
        r["speedup_vs_gaussian"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        r["peak_rss_vs_gaussian"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    accuracy = spawn(["--child", "accuracy", "--acc-n", str(args.acc_n)])
    print(json.dumps(accuracy), flush=True)
    result = {
        "benchmark": "harvest_speed",
        "description": "per-sample margin Jacobians of a 2-layer transformer (modular arithmetic), projected to k dims",
        "baseline": "gaussian (dense, 256 MiB block cache, rest regenerated per chunk)",
        "settings": {"k": args.k, "samples": args.n, "batch_size": args.batch, "chunk_size": args.chunk,
                     "mode": "margin", "sjlt_s": 4},
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "speed": speed,
        "accuracy": accuracy,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "command": "python benchmarks/harvest_speed.py",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
