"""Modular arithmetic: task attribution against real retraining (the paper's Table 3, appendix B).

Setup (paper appendix B): every equation ``a op b = c (mod p)`` for ``a, b < p``; the operations
``a + b`` and ``a^2 + ab + b^2``; tokens ``a, op, b, =`` and the label ``c`` predicted from the last
position; a 2-layer decoder-only transformer with embedding 128; a random 90/10 train/test split;
K = 25 tasks, the 5 x 5 grid of ``(a // 20, b // 20)`` (for p = 97; ``ceil(p / 5)`` in general).

What the recipe does, per operation and seed:

1. **W0**: pretrain the transformer from scratch on the operation's whole training split
   (AdamW, ``pretrain_steps``), so fine-tuning starts from a model that has partly generalized.
2. **Attribution run** (Lightning): fine-tune from W0 on all 25 tasks with the
   :class:`lightning_ksm.TaskAttribution` callback attributing the test loss (target ``"all"``, and
   per test-set group) to the 25 tasks. The callback snapshots W0, harvests margins and projected
   gradients, runs GradEx on its own subsets and writes its report (``<run>/ksm/report``).
3. **GradEx on the evaluation subsets** (engine): from the callback's saved harvest, GradEx F^ on
   exactly the ``n_subsets`` subsets (ratio 0.9) that are really retrained, so both sides are
   compared on the same subsets.
4. **Real retraining** (:func:`lightning_ksm.retrain.retrain_subsets`): fine-tune a fresh copy of
   W0 on every subset with the same recipe, record the real test loss F(s). Batches use common
   random numbers: every subset walks the same seeded permutation of the *whole* training split and
   drops the samples of excluded tasks, so two subsets differ only through their data.
5. **Scores** (:func:`lightning_ksm.retrain.compare_with_retraining`): the first ``n_fit``
   subsets fit linear and kernel surrogates on GradEx F^ and on real F; the rest are held out; LDS
   and residual error against real F, GradEx's relative error, and wall times.

Run ``python -m recipes.modular_arithmetic --quick`` (about 15 s) or the full run behind
``benchmarks/results/modular_arithmetic.json``: ``--seeds 3 --subsets 100 --n-fit 40`` (both
operations; the first 50 subsets are the paper's design). docs/results.md has the numbers, how
long it took, and where they differ from the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `lightning_ksm` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_ksm.retrain import compare_with_retraining, retrain_subsets  # noqa: E402
from lightning_ksm.subsets import sample_subsets  # noqa: E402

OPERATIONS = ("add", "quad")
PAPER_TABLE3 = {  # LDS, mean +- std over five runs (paper Table 3)
    "add": {"linear_surrogate": (0.18, 0.02), "kernelsm": (0.30, 0.12)},
    "quad": {"linear_surrogate": (0.44, 0.09), "kernelsm": (0.52, 0.08)},
}
PAPER_TABLE2_RELATIVE_ERROR = (2.40, 2.17)  # percent, modular arithmetic


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """Every setting of the recipe (recorded in the results JSON)."""

    p: int = 97
    grid: int = 5  # tasks = grid x grid cells of (a // width, b // width), width = ceil(p / grid)
    train_fraction: float = 0.9
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512
    # W0: pretraining on the whole training split
    pretrain_steps: int = 600
    pretrain_batch: int = 512
    pretrain_lr: float = 1e-3
    weight_decay: float = 1.0
    # fine-tuning from W0 (the attribution run and every real retraining): short and gentle, the
    # regime GradEx linearizes (a pilot showed seed noise above the subset signal at lr 1e-3)
    finetune_steps: int = 60
    finetune_batch: int = 256
    finetune_lr: float = 3e-5
    finetune_weight_decay: float = 0.0
    finetune_optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    # evaluation subsets (really retrained); the paper: 50 subsets, the first 40 fit, 10 held out.
    # With more subsets the extra ones are held out too (the first 50 stay the paper's design).
    n_subsets: int = 50
    n_fit: int = 40
    subset_p: float = 0.9
    paper_subsets: int = 50
    # the callback / GradEx
    projection: str = "sjlt"
    proj_dim: int = 1024
    lam: float = 1e-2
    gradex_weighting: str = "sample"  # real training draws samples uniformly from the union
    callback_subsets: int = 100
    # execution
    n_jobs: int = 1
    threads: Optional[int] = 1

    @property
    def width(self) -> int:
        return math.ceil(self.p / self.grid)

    @property
    def n_tasks(self) -> int:
        return self.grid * self.grid


FULL = RecipeConfig()
QUICK = RecipeConfig(
    p=31, pretrain_steps=100, pretrain_batch=128, finetune_steps=12, finetune_batch=96, finetune_lr=1e-4,
    n_subsets=14, n_fit=10, proj_dim=128, callback_subsets=20,
)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class ModularData:
    """All ``p^2`` equations of one operation with their task (grid cell) and the split.

    ``tokens``: ``(p^2, 4)`` long ``[a, op, b, =]``; ``labels``: ``(p^2,)`` long ``c``;
    ``groups``: ``(p^2,)`` task index ``(a // w) * grid + b // w``; ``group_names[t]`` = ``"a{i}b{j}"``;
    ``train``/``test``: positions of the split.
    """

    p: int
    op: str
    tokens: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    group_names: list
    train: torch.Tensor
    test: torch.Tensor


def make_data(cfg: RecipeConfig, op: str, seed: int) -> ModularData:
    """The dataset of ``op`` ("add": a + b, "quad": a^2 + ab + b^2, mod p) with a seeded split."""
    if op not in OPERATIONS:
        raise ValueError(f"op must be one of {OPERATIONS}, got {op!r}")
    p = cfg.p
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    c = (a + b) % p if op == "add" else (a * a + a * b + b * b) % p
    # vocabulary: numbers 0..p-1, the operation token p, "=" token p + 1
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    w = cfg.width
    groups = (a // w) * cfg.grid + (b // w)
    names = [f"a{i}b{j}" for i in range(cfg.grid) for j in range(cfg.grid)]
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(10_000 + seed))
    n_train = int(round(cfg.train_fraction * p * p))
    return ModularData(p, op, tokens, c, groups, names, perm[:n_train].sort().values, perm[n_train:].sort().values)


class TaskDataset(torch.utils.data.Dataset):
    """``(tokens, label, task_name)`` samples at the given positions (for the Lightning run)."""

    def __init__(self, data: ModularData, positions: torch.Tensor):
        self.data, self.positions = data, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        j = int(self.positions[i])
        return self.data.tokens[j], self.data.labels[j], self.data.group_names[int(self.data.groups[j])]


# ---------------------------------------------------------------------------------------------
# Model: a plain-torch decoder-only transformer (torch.func / vmap friendly: no fused attention)
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention and a ReLU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, seq_len: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)
        self.register_buffer("causal", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class ModularTransformer(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks, final LayerNorm, logits over the p answers
    read at the last position (the "=" token)."""

    def __init__(self, p: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, d_mlp: int = 512):
        super().__init__()
        self.embed = nn.Embedding(p + 2, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(4, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, -1]))


def new_model(cfg: RecipeConfig, seed: int) -> ModularTransformer:
    """A freshly initialized transformer (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ModularTransformer(cfg.p, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_mlp)


def _optimizer(model: nn.Module, lr: float, weight_decay: float, kind: str = "adamw") -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if kind != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {kind!r}")
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def pretrain(cfg: RecipeConfig, data: ModularData, seed: int) -> dict:
    """W0: ``pretrain_steps`` AdamW steps on random batches of the whole training split."""
    model = new_model(cfg, seed)
    opt = _optimizer(model, cfg.pretrain_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(20_000 + seed)
    train = data.train
    for _ in range(cfg.pretrain_steps):
        idx = train[torch.randint(0, len(train), (cfg.pretrain_batch,), generator=gen)]
        loss = nn.functional.cross_entropy(model(data.tokens[idx]), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(model: nn.Module, cfg: RecipeConfig, data: ModularData, subset: np.ndarray, seed: int,
             *, return_optimizer: bool = False):
    """Fine-tune ``model`` in place on the training samples of the tasks in ``subset``.

    Common random numbers: batches are consecutive slices of seeded permutations of the *whole*
    training split, with the samples of excluded tasks dropped; every subset takes exactly
    ``finetune_steps`` optimizer steps. Two subsets therefore see the same batch sequence except for
    the excluded tasks' samples. ``return_optimizer``: return ``(model, optimizer)`` (its state is
    what a run record reads).
    """
    keep = torch.as_tensor(np.asarray(subset, dtype=bool))[data.groups[data.train]]
    opt = _optimizer(model, cfg.finetune_lr, cfg.finetune_weight_decay, cfg.finetune_optimizer)
    gen = torch.Generator().manual_seed(30_000 + seed)
    n, B, step = len(data.train), cfg.finetune_batch, 0
    model.train()
    while step < cfg.finetune_steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, B):
            if step == cfg.finetune_steps:
                break
            local = perm[start:start + B]
            local = local[keep[local]]
            step += 1
            if len(local) == 0:
                continue
            idx = data.train[local]
            loss = nn.functional.cross_entropy(model(data.tokens[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return (model, opt) if return_optimizer else model


@torch.no_grad()
def evaluate(model: nn.Module, data: ModularData) -> dict:
    """Test loss: ``"all"`` (mean over the test split) and per test-set group (grid cell)."""
    model.eval()
    idx = data.test
    losses = nn.functional.cross_entropy(model(data.tokens[idx]), data.labels[idx], reduction="none").double()
    groups = data.groups[idx]
    out = {"all": float(losses.mean())}
    for t, name in enumerate(data.group_names):
        mask = groups == t
        if mask.any():
            out[name] = float(losses[mask].mean())
    return out


class FinetuneSubset:
    """``train_fn(subset, seed)`` for :func:`retrain_subsets`: W0 -> fine-tune on the subset -> test
    losses. Picklable (it carries only the config and a path); data and W0 are built lazily in
    each process."""

    def __init__(self, cfg: RecipeConfig, op: str, data_seed: int, w0_path: str):
        self.cfg, self.op, self.data_seed, self.w0_path = cfg, op, data_seed, w0_path
        self._cache = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"} | {"_cache": None}

    def __call__(self, subset: np.ndarray, seed: int) -> dict:
        if self._cache is None:
            data = make_data(self.cfg, self.op, self.data_seed)
            self._cache = (data, torch.load(self.w0_path, weights_only=True))
        data, w0 = self._cache
        model = new_model(self.cfg, 0)
        model.load_state_dict(w0)
        return evaluate(finetune(model, self.cfg, data, subset, seed), data)


# ---------------------------------------------------------------------------------------------
# The attribution run: Lightning + the TaskAttribution callback
# ---------------------------------------------------------------------------------------------


def _lightning_module_class():
    from lightning.pytorch import LightningModule

    class ModularModule(LightningModule):
        """Fine-tunes the transformer from W0 on ``(tokens, label, task_name)`` batches."""

        def __init__(self, cfg: RecipeConfig, w0: dict):
            super().__init__()
            self.cfg = cfg
            self.model = new_model(cfg, 0)
            self.model.load_state_dict(w0)

        def forward(self, tokens):
            return self.model(tokens)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, batch_size=len(y))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("test_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(y))

        def configure_optimizers(self):
            cfg = self.cfg
            return _optimizer(self.model, cfg.finetune_lr, cfg.finetune_weight_decay, cfg.finetune_optimizer)

    return ModularModule


def attribution_run(cfg: RecipeConfig, data: ModularData, w0: dict, run_dir: str, seed: int):
    """Fine-tune from W0 on all tasks with the TaskAttribution callback; returns the callback
    (``.report``, ``.harvest_dir``, ``.timings``) and the fit's wall time."""
    import lightning.pytorch as L

    from lightning_ksm import TaskAttribution

    torch.manual_seed(seed)
    module = _lightning_module_class()(cfg, w0)
    train_loader = torch.utils.data.DataLoader(
        TaskDataset(data, data.train), batch_size=cfg.finetune_batch, shuffle=True,
        generator=torch.Generator().manual_seed(40_000 + seed),
    )
    test_loader = torch.utils.data.DataLoader(TaskDataset(data, data.test), batch_size=512)
    callback = TaskAttribution(
        projection=cfg.projection, proj_dim=cfg.proj_dim, proj_seed=seed, output="margin",
        n_subsets=cfg.callback_subsets, subset_p=cfg.subset_p, lam=cfg.lam, seed=seed,
        dirpath=os.path.join(run_dir, "ksm"), progress=False, raise_on_analysis_error=True,
        task_names=data.group_names,
        overwrite=True,  # only reached when no report exists: an interrupted attempt is redone
    )
    trainer = L.Trainer(
        max_steps=cfg.finetune_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=run_dir, callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, test_loader)
    return callback, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# One operation x seed
# ---------------------------------------------------------------------------------------------


def _store_columns(store_names: list, group_names: list) -> np.ndarray:
    """Column j of the store's task order is task ``group_names[perm[j]]``."""
    missing = [n for n in store_names if n not in group_names]
    if missing:
        raise RuntimeError(f"harvested task names {missing} are not grid cells")
    return np.array([group_names.index(n) for n in store_names])


def evaluation_subsets(cfg: RecipeConfig, seed: int) -> np.ndarray:
    """The really retrained subsets: ``paper_subsets`` distinct Bernoulli(``subset_p``) subsets,
    then (when ``n_subsets`` is larger) further distinct ones from a second seeded stream, so the
    first block is the same design whatever ``n_subsets`` is (and its retrainings are reused)."""
    first = min(cfg.n_subsets, cfg.paper_subsets)
    S = sample_subsets(cfg.n_tasks, first, p=cfg.subset_p, seed=50_000 + seed, unique=True)
    if cfg.n_subsets > first:
        seen = {row.tobytes() for row in S}
        extra = []
        pool = sample_subsets(cfg.n_tasks, 4 * cfg.n_subsets, p=cfg.subset_p, seed=60_000 + seed, unique=True)
        for row in pool:
            if row.tobytes() not in seen and len(extra) < cfg.n_subsets - first:
                seen.add(row.tobytes())
                extra.append(row)
        S = np.vstack([S, np.array(extra)])
    return S


def run_one(cfg: RecipeConfig, op: str, seed: int, out_dir: str, *, log=print) -> dict:
    """The whole pipeline for one operation and seed; resumable through files in ``out_dir``."""
    from lightning_ksm.analysis import present_tasks_only
    from lightning_ksm.estimation import gradex
    from lightning_ksm.report import AttributionReport
    from lightning_ksm.store import FeatureStore

    run_dir = os.path.join(out_dir, op, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    data = make_data(cfg, op, seed)
    timings = {}

    # 1. W0
    w0_path = os.path.join(run_dir, "w0.pt")
    if os.path.exists(w0_path):
        w0 = torch.load(w0_path, weights_only=True)
        timings["pretrain"] = json.load(open(w0_path + ".json"))["seconds"]
    else:
        start = time.perf_counter()
        w0 = pretrain(cfg, data, seed)
        timings["pretrain"] = time.perf_counter() - start
        torch.save(w0, w0_path)
        with open(w0_path + ".json", "w") as fh:
            json.dump({"seconds": timings["pretrain"]}, fh)
    model = new_model(cfg, 0)
    model.load_state_dict(w0)
    f_w0 = evaluate(model, data)
    log(f"[{op} seed {seed}] W0 test loss {f_w0['all']:.4f} (pretraining {timings['pretrain']:.0f}s)")

    # 2. attribution run with the callback (skipped when its report exists)
    ksm_dir = os.path.join(run_dir, "ksm")
    report_dir, harvest_dir = os.path.join(ksm_dir, "report"), os.path.join(ksm_dir, "harvest")
    if os.path.exists(os.path.join(report_dir, "report.json")):
        report = AttributionReport.load(report_dir)
        timings["attribution_fit"] = report.timings.get("attribution_fit", float("nan"))
    else:
        callback, fit_seconds = attribution_run(cfg, data, w0, run_dir, seed)
        report = callback.report
        report.timings["attribution_fit"] = fit_seconds
        report.save(report_dir)
        timings["attribution_fit"] = fit_seconds
    timings["harvest"] = float(report.timings["harvest"])
    timings["callback_gradex"] = float(report.timings["gradex"])
    timings["callback_surrogate_and_readouts"] = float(report.timings["surrogate"] + report.timings["readouts"])

    # 3. GradEx F^ on the evaluation subsets, from the callback's harvest
    S = evaluation_subsets(cfg, seed)
    store = FeatureStore(harvest_dir)
    source = present_tasks_only(store.load("source"))
    target = present_tasks_only(store.load("target"))
    cols = _store_columns([str(n) for n in source.task_names], data.group_names)
    start = time.perf_counter()
    est = gradex(source, target, S[:, cols], lam=cfg.lam, weighting=cfg.gradex_weighting)
    timings["gradex_eval_subsets"] = time.perf_counter() - start
    log(f"[{op} seed {seed}] GradEx on {len(S)} subsets: {timings['gradex_eval_subsets']:.1f}s "
        f"(+ harvest {timings['harvest']:.1f}s)")

    # 4. real retraining on the same subsets
    train_fn = FinetuneSubset(cfg, op, seed, w0_path)
    real = retrain_subsets(train_fn, S, directory=os.path.join(run_dir, "retrain"), seed=seed,
                           n_jobs=cfg.n_jobs, threads_per_job=cfg.threads, task_names=data.group_names)
    timings["retrain_wall"] = real.wall_time
    timings["retrain_training_sum"] = real.training_seconds
    log(f"[{op} seed {seed}] real retraining: {real.n_trained} trained now, "
        f"{real.training_seconds:.0f}s of training in total")

    # 5. scores on the shared target columns
    names = [n for n in est.target_names if n in real.target_names]
    E = est.losses[:, [est.target_names.index(n) for n in names]]
    F = real.losses[:, [real.target_names.index(n) for n in names]]
    j_all = names.index("all")
    comparison = compare_with_retraining(S, F[:, j_all], E[:, j_all], n_fit=cfg.n_fit)
    per_group = compare_with_retraining(S, np.delete(F, j_all, 1), np.delete(E, j_all, 1), n_fit=cfg.n_fit)
    # the paper's protocol on the first 50 subsets (40 fit, 10 held out), when more were retrained
    m0 = min(cfg.paper_subsets, len(S))
    paper_protocol = compare_with_retraining(S[:m0], F[:m0, j_all], E[:m0, j_all], n_fit=min(cfg.n_fit, m0 - 2))
    full_real = train_fn(np.ones(cfg.n_tasks, dtype=bool), seed)["all"]
    result = {
        "op": op,
        "seed": seed,
        "target": "all",
        "comparison": comparison,
        "per_group_targets": per_group,
        "paper_protocol": paper_protocol,
        "f_w0": f_w0["all"],
        "f_full_real": full_real,
        "real_f": {"mean": float(F[:, j_all].mean()), "std": float(F[:, j_all].std()),
                   "min": float(F[:, j_all].min()), "max": float(F[:, j_all].max())},
        "gradex_f": {"mean": float(E[:, j_all].mean()), "std": float(E[:, j_all].std())},
        "gradex_converged": int(est.converged.sum()),
        "callback_report": {
            "heldout_lds_kernel": report.fit_quality.get("heldout_lds"),
            "heldout_lds_linear": report.fit_quality.get("linear_heldout_lds"),
            "top_helpers_all": [t for t, _ in report.top_helpers(3, target="all")],
            "top_hurters_all": [t for t, _ in report.top_hurters(3, target="all")],
        },
        "timings": timings,
        "subsets": S.astype(int).tolist(),
        "real_all": F[:, j_all].tolist(),
        "gradex_all": E[:, j_all].tolist(),
    }
    c = comparison
    log(f"[{op} seed {seed}] LDS gradex->kernel {c['gradex_kernel']['lds']:.3f} "
        f"gradex->linear {c['gradex_linear']['lds']:.3f} real->kernel {c['real_kernel']['lds']:.3f} "
        f"real->linear {c['real_linear']['lds']:.3f}; GradEx rel. error {c['gradex']['relative_error_median']:.4f}")
    return result


# ---------------------------------------------------------------------------------------------
# Summary and command line
# ---------------------------------------------------------------------------------------------

_SUMMARY_KEYS = {
    "lds_gradex_kernel": ("gradex_kernel", "lds"),
    "lds_gradex_linear": ("gradex_linear", "lds"),
    "lds_real_kernel": ("real_kernel", "lds"),
    "lds_real_linear": ("real_linear", "lds"),
    "residual_gradex_kernel": ("gradex_kernel", "residual_error"),
    "residual_gradex_linear": ("gradex_linear", "residual_error"),
    "residual_real_kernel": ("real_kernel", "residual_error"),
    "residual_real_linear": ("real_linear", "residual_error"),
    "residual_own_gradex_kernel": ("gradex_kernel", "residual_error_own"),
    "residual_own_gradex_linear": ("gradex_linear", "residual_error_own"),
    "lds_own_gradex_kernel": ("gradex_kernel", "lds_own"),
    "lds_own_gradex_linear": ("gradex_linear", "lds_own"),
    "gradex_lds_heldout": ("gradex", "lds_heldout"),
    "gradex_lds_all": ("gradex", "lds_all"),
    "gradex_relative_error_median": ("gradex", "relative_error_median"),
    "gradex_relative_error_mean": ("gradex", "relative_error_mean"),
}


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(runs: list) -> dict:
    """Mean and sample standard deviation (ddof=1) over seeds, per operation."""
    out = {}
    for op in sorted({r["op"] for r in runs}):
        rs = [r for r in runs if r["op"] == op]
        s = {key: _stats([r["comparison"][a][b] for r in rs]) for key, (a, b) in _SUMMARY_KEYS.items()}
        s["paper_protocol"] = {key: _stats([r["paper_protocol"][a][b] for r in rs])
                               for key, (a, b) in _SUMMARY_KEYS.items()}
        s["n_fit"], s["n_heldout"] = rs[0]["comparison"]["n_fit"], rs[0]["comparison"]["n_heldout"]
        s["paper_protocol"]["n_fit"] = rs[0]["paper_protocol"]["n_fit"]
        s["paper_protocol"]["n_heldout"] = rs[0]["paper_protocol"]["n_heldout"]
        s["per_group_lds_gradex_kernel"] = _stats([r["per_group_targets"]["gradex_kernel"]["lds"] for r in rs])
        s["per_group_lds_gradex_linear"] = _stats([r["per_group_targets"]["gradex_linear"]["lds"] for r in rs])
        s["per_group_lds_real_kernel"] = _stats([r["per_group_targets"]["real_kernel"]["lds"] for r in rs])
        s["per_group_lds_real_linear"] = _stats([r["per_group_targets"]["real_linear"]["lds"] for r in rs])
        s["f_w0"] = _stats([r["f_w0"] for r in rs])
        s["f_full_real"] = _stats([r["f_full_real"] for r in rs])
        s["real_f_std_across_subsets"] = _stats([r["real_f"]["std"] for r in rs])
        t = [r["timings"] for r in rs]
        s["seconds_real_retraining"] = _stats([x["retrain_training_sum"] for x in t])
        s["seconds_gradex_harvest_plus_solve"] = _stats([x["harvest"] + x["gradex_eval_subsets"] for x in t])
        s["seconds_gradex_solve"] = _stats([x["gradex_eval_subsets"] for x in t])
        s["seconds_harvest"] = _stats([x["harvest"] for x in t])
        s["n_seeds"] = len(rs)
        out[op] = s
    return out


def _pm(stat: dict, digits: int = 2, scale: float = 1.0) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_tables(results: dict) -> str:
    """Markdown tables (Table 3 layout) from a results dict, as quoted in docs/results.md."""
    summ, ops = results["summary"], [op for op in OPERATIONS if op in results["summary"]]
    title = {"add": "Addition", "quad": "Quadratic"}
    n = {op: summ[op]["n_seeds"] for op in ops}
    some = summ[ops[0]]
    pp = some["paper_protocol"]
    proto = [(f"{some['n_fit']} fit / {some['n_heldout']} held out", lambda op, key: summ[op][key])]
    if (pp["n_fit"], pp["n_heldout"]) != (some["n_fit"], some["n_heldout"]):
        proto.append((f"{pp['n_fit']} fit / {pp['n_heldout']} held out",
                      lambda op, key: summ[op]["paper_protocol"][key]))
    head = "| | " + " | ".join(
        " | ".join(f"{title[op]}: ours, {name}" for name, _ in proto) + f" | {title[op]}: paper" for op in ops
    ) + " |"
    rule = "|---|" + ("---:|" * (len(proto) + 1)) * len(ops)
    rows = [
        ("Linear surrogate on real F(s) (40 retrainings)", "lds_real_linear", "linear_surrogate"),
        ("Kernel surrogate on real F(s) (40 retrainings)", "lds_real_kernel", None),
        ("Linear surrogate on GradEx F^(s)", "lds_gradex_linear", None),
        ("**KernelSM**: kernel surrogate on GradEx F^(s)", "lds_gradex_kernel", "kernelsm"),
        ("GradEx F^(s) itself, no surrogate", "gradex_lds_heldout", None),
    ]
    lines = [f"LDS on held-out subsets (Spearman with the really retrained test loss), mean ± std over "
             f"{n[ops[0]]} seeds:", "", head, rule]
    for label, key, paper in rows:
        cells = []
        for op in ops:
            ref = PAPER_TABLE3[op].get(paper) if paper else None
            cells += [_pm(get(op, key)) for _, get in proto]
            cells.append(f"{ref[0]:.2f} ± {ref[1]:.2f}" if ref else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Residual error on the {some['n_heldout']} held-out subsets (sum of squared errors / total sum of squares; "
              "1 = no better than the mean):", "", "| | " + " | ".join(title[op] for op in ops) + " |",
              "|---|" + "---:|" * len(ops)]
    for label, key in (("Linear surrogate on real F(s), against real F", "residual_real_linear"),
                       ("Kernel surrogate on real F(s), against real F", "residual_real_kernel"),
                       ("Linear surrogate on GradEx F^(s), against real F", "residual_gradex_linear"),
                       ("Kernel surrogate on GradEx F^(s), against real F", "residual_gradex_kernel"),
                       ("Linear surrogate on GradEx F^(s), against GradEx F^", "residual_own_gradex_linear"),
                       ("Kernel surrogate on GradEx F^(s), against GradEx F^", "residual_own_gradex_kernel")):
        lines.append(f"| {label} | " + " | ".join(_pm(summ[op][key]) for op in ops) + " |")
    m = some["n_fit"] + some["n_heldout"]
    lines += ["", f"GradEx against real retraining, and cost (per seed: {m} subsets):", "",
              "| | " + " | ".join(title[op] for op in ops) + " |", "|---|" + "---:|" * len(ops)]
    stats = [
        ("GradEx relative error \|F^ - F\| / F, median over subsets (%)", "gradex_relative_error_median", 2, 100.0),
        ("GradEx relative error, mean (%)", "gradex_relative_error_mean", 2, 100.0),
        ("GradEx LDS against real F, all subsets", "gradex_lds_all", 2, 1.0),
        ("test loss at W0", "f_w0", 4, 1.0),
        ("test loss after real fine-tuning on all 25 tasks", "f_full_real", 4, 1.0),
        ("std of the real test loss across subsets", "real_f_std_across_subsets", 5, 1.0),
        ("real retraining of all subsets (s, one core)", "seconds_real_retraining", 0, 1.0),
        ("GradEx: harvest + solve for all subsets (s, one core)", "seconds_gradex_harvest_plus_solve", 1, 1.0),
        ("of which the GradEx solve (s)", "seconds_gradex_solve", 1, 1.0),
    ]
    for label, key, digits, scale in stats:
        lines.append(f"| {label} | " + " | ".join(_pm(summ[op][key], digits, scale) for op in ops) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Command line entry point; returns the results dict it writes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small p, few subsets and steps (about a minute)")
    parser.add_argument("--ops", nargs="+", choices=OPERATIONS, default=None,
                        help="operations (default: both; --quick: add)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--out", default=None, help="run directory (resumable; default runs/modular_arithmetic[_quick])")
    parser.add_argument("--results", default=None,
                        help="results JSON (default: <out>/modular_arithmetic.json)")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel retraining processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (per process; default 1: fastest on a shared 2-core machine)")
    parser.add_argument("--subsets", type=int, default=None, help="evaluation subsets (default 50; 40 fit)")
    parser.add_argument("--n-fit", type=int, default=None, help="subsets that fit the surrogates")
    parser.add_argument("--tables", metavar="RESULTS_JSON", default=None,
                        help="print the markdown tables of an existing results file and exit")
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables) as fh:
            print(format_tables(json.load(fh)))
        return {}

    cfg = QUICK if args.quick else FULL
    over = {"n_jobs": args.n_jobs, "threads": args.threads}
    if args.subsets is not None:
        over["n_subsets"] = args.subsets
        over["n_fit"] = args.n_fit or int(round(0.8 * args.subsets))
    elif args.n_fit is not None:
        over["n_fit"] = args.n_fit
    cfg = replace(cfg, **over)
    if not 2 <= cfg.n_fit <= cfg.n_subsets - 2:
        parser.error(f"--n-fit must leave at least 2 of the {cfg.n_subsets} subsets held out")
    ops = args.ops or (["add"] if args.quick else list(OPERATIONS))
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    out_dir = args.out or os.path.join("runs", "modular_arithmetic_quick" if args.quick else "modular_arithmetic")
    results_path = args.results or os.path.join(out_dir, "modular_arithmetic.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    start = time.perf_counter()
    runs = [run_one(cfg, op, seed, out_dir) for op in ops for seed in range(n_seeds)]
    results = {
        "name": "modular_arithmetic",
        "mode": "quick" if args.quick else "full",
        "command": "python -m recipes.modular_arithmetic " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(cfg),
        "ops": ops,
        "seeds": list(range(n_seeds)),
        "summary": summarize(runs),
        "paper": {"table3_lds": PAPER_TABLE3, "table2_relative_error_percent": PAPER_TABLE2_RELATIVE_ERROR},
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        },
        "total_wall_seconds_this_invocation": time.perf_counter() - start,
        # the pipeline's compute over all runs, also when parts were loaded from an earlier invocation
        "total_compute_seconds": float(sum(
            r["timings"]["pretrain"] + r["timings"]["attribution_fit"] + r["timings"]["gradex_eval_subsets"]
            + r["timings"]["retrain_training_sum"] for r in runs)),
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {results_path} ({results['total_wall_seconds_this_invocation']:.0f}s)")
    return results


if __name__ == "__main__":
    main()
