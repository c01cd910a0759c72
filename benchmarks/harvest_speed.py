"""Harvest throughput and peak memory: dense Gaussian vs SJLT projection, on the modular-arithmetic model.

The model is the setting's 2-layer decoder-only transformer (d_model 128, 4 heads, MLP 512,
vocab 100, 4 input tokens, ~423k parameters; hand-written attention so that torch.func.vmap works).
Configurations (k = 512, mode "margin", batches of 256, chunk_size 256):

- ``grads_only``: per-sample gradients with a projector that discards them (the floor: no projection);
- ``gaussian``: dense Gaussian, default 256 MiB block cache, the rest regenerated per chunk
  (the ratio baseline);
- ``gaussian_cached``: dense Gaussian with a cache large enough for the whole d x k matrix;
- ``sjlt``: sparse sign sketch, s = 4.

Throughput: one child process (1 torch thread by default: timings on a shared machine are far
steadier single-threaded) times every configuration on the same 512 samples in 4 interleaved rounds
(rotated order, after a one-batch warm-up that fills the caches and is reported separately); the
fastest round counts, as in ``timeit``; process CPU time is recorded too. Peak memory: each configuration
harvests two batches in its own child process and reports ru_maxrss. A third part measures projection
accuracy on 64 exact per-sample gradients, for k in {128, 512, 2048}: the spread of projected/true
norms, and the error of projected inner products relative to the norms,
|<Pg_i, Pg_j> - <g_i, g_j>| / (|g_i| |g_j|) over pairs (JL theory: rms about 1/sqrt(k)).

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

from lightning_ksm.harvesting import exact_gradients, harvest, projector_for_model  # noqa: E402
from lightning_ksm.harvesting.projection import Projector, make_projector  # noqa: E402

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


CONFIGS = ("grads_only", "gaussian", "gaussian_cached", "sjlt")


def _batches(n: int, batch: int, seed: int):
    tokens, labels = make_data(n, seed=seed)
    return [(tokens[s: s + batch], labels[s: s + batch], [0] * len(tokens[s: s + batch])) for s in range(0, n, batch)]


def run_memory(config: str, k: int, batch: int, chunk: int) -> dict:
    """Peak resident memory of one configuration over two batches (own child process)."""
    torch.manual_seed(0)
    model = Transformer()
    proj = build_projector(config, model, k)
    rss_before = rss_mb()
    feats = harvest(model, _batches(2 * batch, batch, seed=1), projector=proj, chunk_size=chunk)
    assert feats.jacobians.shape == (2 * batch, k)
    return {"config": config, "rss_before_harvest_mb": round(rss_before, 1), "peak_rss_mb": round(rss_mb(), 1)}


def run_speed(n: int, k: int, batch: int, chunk: int, rounds: int) -> dict:
    """Throughput of all configurations in one process, in interleaved rounds (child process).

    The machine may be shared, so every round times each configuration once, in a rotated order,
    and the fastest round of each is its throughput (as ``timeit`` does).
    """
    torch.manual_seed(0)
    model = Transformer()
    projs = {c: build_projector(c, model, k) for c in CONFIGS}
    warm = _batches(batch, batch, seed=2)
    warmup = {}
    for c in CONFIGS:  # fills the block caches; the first-use cost is reported separately
        t0 = time.perf_counter()
        harvest(model, warm, projector=projs[c], chunk_size=chunk)
        warmup[c] = time.perf_counter() - t0
    data = _batches(n, batch, seed=1)
    times = {c: [] for c in CONFIGS}
    cpu = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]
        for c in order:
            t0, c0 = time.perf_counter(), time.process_time()
            feats = harvest(model, data, projector=projs[c], chunk_size=chunk)
            times[c].append(time.perf_counter() - t0)
            cpu[c].append(time.process_time() - c0)
            assert feats.jacobians.shape == (n, k)
    out = {}
    for c in CONFIGS:
        best, median = min(times[c]), float(np.median(times[c]))
        out[c] = {
            "config": c,
            "n_params": sum(p.numel() for p in model.parameters()),
            "samples_per_round": n,
            "round_seconds": [round(t, 3) for t in times[c]],
            "round_cpu_seconds": [round(t, 3) for t in cpu[c]],
            "samples_per_cpu_s": round(n / min(cpu[c]), 1),
            "samples_per_s": round(n / best, 1),
            "samples_per_s_median": round(n / median, 1),
            "warmup_batch_s": round(warmup[c], 3),
        }
    return out


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
            scale = torch.outer(g.norm(dim=1), g.norm(dim=1))
            cos_err = ((pgram - gram) / scale)[~torch.eye(n, dtype=torch.bool)].abs()
            rows.append({
                "kind": kind,
                "k": k,
                "norm_ratio_mean": round(float(ratio.mean()), 4),
                "norm_ratio_std": round(float(ratio.std()), 4),
                "norm_ratio_std_theory": round(math.sqrt(1 / (2 * k)), 4),
                "inner_product_error_mean": round(float(cos_err.mean()), 4),
                "inner_product_error_max": round(float(cos_err.max()), 4),
                "inner_product_error_theory_rms": round(1 / math.sqrt(k), 4),
                "gram_rel_fro_error": round(float((pgram - gram).norm() / gram.norm()), 4),
                "project_seconds": round(secs, 3),
            })
    return {"n_samples": n, "d": int(g.shape[1]), "results": rows}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "accuracy":
        out = run_accuracy(args.acc_n, [128, 512, 2048])
    elif args.child == "speed":
        out = run_speed(args.n, args.k, args.batch, args.chunk, args.rounds)
    else:
        out = run_memory(args.child, args.k, args.batch, args.chunk)
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
    ap.add_argument("--n", type=int, default=512, help="samples timed per configuration and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the timed children")
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
    common = ["--k", str(args.k), "--batch", str(args.batch), "--chunk", str(args.chunk),
              "--threads", str(args.threads)]
    t_start = time.perf_counter()
    timing = spawn(["--child", "speed", "--n", str(args.n), "--rounds", str(args.rounds)] + common)
    speed = []
    for config in CONFIGS:
        mem = spawn(["--child", config] + common)
        row = dict(timing[config], **mem)
        print(json.dumps(row), flush=True)
        speed.append(row)
    base = next(r for r in speed if r["config"] == "gaussian")
    for r in speed:
        r["speedup_vs_gaussian"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        r["speedup_vs_gaussian_median"] = round(r["samples_per_s_median"] / base["samples_per_s_median"], 2)
        r["peak_rss_vs_gaussian"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
    accuracy = spawn(["--child", "accuracy", "--acc-n", str(args.acc_n)])
    print(json.dumps(accuracy), flush=True)
    result = {
        "benchmark": "harvest_speed",
        "description": "per-sample margin Jacobians of a 2-layer transformer (modular arithmetic), projected to k dims",
        "baseline": "gaussian (dense, 256 MiB block cache, rest regenerated per chunk)",
        "settings": {"k": args.k, "samples_per_round": args.n, "rounds": args.rounds,
                     "batch_size": args.batch, "chunk_size": args.chunk, "mode": "margin", "sjlt_s": 4},
        "statistic": "samples_per_s: fastest of the interleaved rounds; peak_rss_mb: ru_maxrss of a "
                     "child process harvesting two batches with that configuration only",
        "machine": {"torch_threads_used": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
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
