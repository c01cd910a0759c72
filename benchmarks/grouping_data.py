"""Real trainings behind the task-grouping and task-selection benchmark (``benchmarks/task_grouping.py``).

Two problems, each trained for real and cached per subset under ``runs/grouping/<problem>/`` (one
``.npz`` per trained subset; rerunning resumes):

- ``modular``: the modular-arithmetic recipe (``recipes/modular_arithmetic.py``, full size: p = 97,
  operation ``quad``, 25 grid-cell tasks, 60 fine-tuning steps from a pretrained W0). Every training
  records the test loss per test sample (941 columns), per test-set grid cell (25) and overall.
- ``planted``: a small multi-task problem with planted groups (below), K = 8; every one of the 255
  subsets is trained, so every grouping is evaluated exactly and the exhaustive optimum is known.

The planted problem: inputs x ~ N(0, I_10); one shared MLP 10 -> 16 (tanh) -> 2 with a single head
(tasks compete for it), full-batch Adam from a fixed random init, 30 training and 200 validation
samples per task, 10% flipped labels.

=========  ==========================  ===========================================================
task       rule                     planted effect
=========  ==========================  ===========================================================
a1..a3     y = [x0 + x1 + .3 d > 0]     one cluster: few samples each, co-training within it helps
b1..b3     y = [-x0 + .5 x1 + .3 d > 0]  a second cluster; conflicts with A (single head)
noisy      random, 80% class 1         hurts every task it is trained with
free       y = [x2 > 0]                 unrelated feature: best on its own
=========  ==========================  ===========================================================

(d is a per-task random direction.) Also computed: per-task gradient cosine affinities and TAG's
lookahead affinities (Fifty et al., 2021), averaged over checkpoints of the all-tasks training.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_ksm.subsets import all_subsets, sample_subsets  # noqa: E402

RUNS = os.path.join(ROOT, "runs", "grouping")
PLANTED_TASKS = ("a1", "a2", "a3", "b1", "b2", "b3", "noisy", "free")


def mask_key(mask) -> str:
    bits = "".join("1" if b else "0" for b in np.asarray(mask, dtype=bool))
    return hashlib.sha1(bits.encode()).hexdigest()[:16]


class Cache:
    """One ``.npz`` per trained subset: ``losses`` (per target column) and ``seconds``."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, mask) -> str:
        return os.path.join(self.directory, mask_key(mask) + ".npz")

    def has(self, mask) -> bool:
        return os.path.exists(self.path(mask))

    def get(self, mask) -> np.ndarray:
        with np.load(self.path(mask)) as z:
            return z["losses"]

    def seconds(self, mask) -> float:
        with np.load(self.path(mask)) as z:
            return float(z["seconds"])

    def put(self, mask, losses, seconds) -> None:
        tmp = self.path(mask) + ".tmp.npz"
        np.savez(tmp, losses=np.asarray(losses, dtype=np.float64), seconds=seconds,
                 mask=np.asarray(mask, dtype=bool))
        os.replace(tmp, self.path(mask))


# ---------------------------------------------------------------------------------------------
# planted problem
# ---------------------------------------------------------------------------------------------
class Planted:
    """The planted grouping problem; ``train(mask)`` -> per-task validation losses (K,)."""

    names = PLANTED_TASKS
    dim, hidden, n_train, n_val, steps, lr = 10, 16, 30, 200, 100, 1e-2

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        d = torch.randn(len(self.names), self.dim, generator=g)
        self.data = []
        for k, name in enumerate(self.names):
            split = []
            for n in (self.n_train, self.n_val):
                x = torch.randn(n, self.dim, generator=g)
                if name == "noisy":
                    y = (torch.rand(n, generator=g) < 0.8).long()
                else:
                    if name.startswith("a"):
                        s = x[:, 0] + x[:, 1] + 0.3 * (x @ d[k])
                    elif name.startswith("b"):
                        s = -x[:, 0] + 0.5 * x[:, 1] + 0.3 * (x @ d[k])
                    else:
                        s = x[:, 2]
                    y = (s > 0).long()
                    flip = torch.rand(n, generator=g) < 0.1
                    y = torch.where(flip, 1 - y, y)
                split.append((x, y))
            self.data.append(split)

    def w0(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + self.seed)
            return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 2))

    def _union(self, mask):
        xs = [self.data[k][0][0] for k in np.flatnonzero(mask)]
        ys = [self.data[k][0][1] for k in np.flatnonzero(mask)]
        return torch.cat(xs), torch.cat(ys)

    def val_losses(self, net) -> np.ndarray:
        with torch.no_grad():
            return np.array([float(nn.functional.cross_entropy(net(x), y)) for _, (x, y) in self.data])

    def train_losses(self, net) -> list:
        return [nn.functional.cross_entropy(net(x), y) for (x, y), _ in self.data]

    def train(self, mask, *, checkpoints=()):
        net = self.w0()
        x, y = self._union(mask)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        saved = []
        for step in range(self.steps):
            if step in checkpoints:
                saved.append({k: v.clone() for k, v in net.state_dict().items()})
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (net, saved) if checkpoints else net


# ---------------------------------------------------------------------------------------------
# modular arithmetic (the recipe's model and fine-tuning)
# ---------------------------------------------------------------------------------------------
class Modular:
    """The recipe at full size, op ``quad``, seed 0; ``train(mask)`` -> [per-sample test losses
    (941), per-cell test losses (25), overall]."""

    op, seed = "quad", 0

    def __init__(self, directory: str):
        from recipes.modular_arithmetic import FULL, make_data

        self.cfg = FULL
        self.data = make_data(self.cfg, self.op, self.seed)
        self.names = list(self.data.group_names)
        self.directory = directory
        self._w0 = None

    def w0_state(self) -> dict:
        from recipes.modular_arithmetic import pretrain

        if self._w0 is None:
            path = os.path.join(self.directory, "w0.pt")
            if not os.path.exists(path):
                start = time.perf_counter()
                state = pretrain(self.cfg, self.data, self.seed)
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
                print(f"[modular] pretrained W0 in {time.perf_counter() - start:.0f}s", flush=True)
            self._w0 = torch.load(path, weights_only=True)
        return self._w0

    def w0(self) -> nn.Module:
        from recipes.modular_arithmetic import new_model

        model = new_model(self.cfg, 0)
        model.load_state_dict(self.w0_state())
        return model

    @torch.no_grad()
    def evaluate(self, model) -> np.ndarray:
        model.eval()
        d = self.data
        idx = d.test
        per = nn.functional.cross_entropy(model(d.tokens[idx]), d.labels[idx], reduction="none").double().numpy()
        groups = d.groups[idx].numpy()
        cells = np.array([per[groups == t].mean() for t in range(len(self.names))])
        return np.concatenate([per, cells, [per.mean()]])

    def train(self, mask):
        from recipes.modular_arithmetic import finetune

        return self.evaluate(finetune(self.w0(), self.cfg, self.data, np.asarray(mask, bool), self.seed))

    def task_train_loss(self, model, k: int, grad: bool = False):
        d = self.data
        idx = d.train[d.groups[d.train] == k]
        with torch.set_grad_enabled(grad):
            return nn.functional.cross_entropy(model(d.tokens[idx]), d.labels[idx])


# ---------------------------------------------------------------------------------------------
# designs and affinities
# ---------------------------------------------------------------------------------------------
def modular_designs(K: int = 25) -> dict:
    """The trained subsets: 80 distinct Bernoulli(0.9) subsets (40 fit, 20 tuning, 20 held-out for
    the surrogate-selection data set), 30 smaller subsets (3..12 tasks) so that group-sized subsets
    are inside the surrogate's support, each task alone, and all tasks."""
    dense = sample_subsets(K, 80, p=0.9, seed=70_000, unique=True)
    rng = np.random.default_rng(71_000)
    small = np.zeros((30, K), dtype=bool)
    for r in range(30):
        small[r, rng.choice(K, size=int(rng.integers(3, 13)), replace=False)] = True
    return {"dense": dense, "small": small, "alone": np.eye(K, dtype=bool), "all": np.ones((1, K), dtype=bool)}


def affinities(problem, losses_fn, params_fn, checkpoints_states, lr: float) -> dict:
    """Gradient cosine (mean over checkpoints) and TAG lookahead affinity Z[i, j] = 1 - L_j(theta -
    lr g_i) / L_j(theta) (mean over checkpoints) from per-task training losses."""
    K = len(problem.names)
    cos_sum, tag_sum = np.zeros((K, K)), np.zeros((K, K))
    for state in checkpoints_states:
        model = problem.w0()
        model.load_state_dict(state)
        params = [p for p in model.parameters()]
        grads = []
        for k in range(K):
            loss = losses_fn(model, k)
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([x.reshape(-1) for x in g]).detach())
        G = torch.stack(grads).double()
        Gn = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos_sum += (Gn @ Gn.T).numpy()
        with torch.no_grad():
            base = np.array([float(losses_fn(model, j)) for j in range(K)])
            flat0 = torch.cat([p.detach().reshape(-1) for p in params])
            for i in range(K):
                new = flat0 - lr * G[i].float()
                torch.nn.utils.vector_to_parameters(new, params)
                after = np.array([float(losses_fn(model, j)) for j in range(K)])
                tag_sum[i] = 1.0 - after / base
            torch.nn.utils.vector_to_parameters(flat0, params)
    n = len(checkpoints_states)
    return {"cosine": cos_sum / n, "tag": tag_sum / n}


def collect_planted(seed: int = 0) -> None:
    problem = Planted(seed)
    cache = Cache(os.path.join(RUNS, "planted"))
    S = all_subsets(len(problem.names))
    start, n_new = time.perf_counter(), 0
    for mask in S:
        if cache.has(mask):
            continue
        t0 = time.perf_counter()
        losses = problem.val_losses(problem.train(mask))
        cache.put(mask, losses, time.perf_counter() - t0)
        n_new += 1
    print(f"[planted] {len(S)} subsets ({n_new} trained now, {time.perf_counter() - start:.0f}s)", flush=True)
    aff_path = os.path.join(RUNS, "planted", "affinities.npz")
    if not os.path.exists(aff_path):
        _, states = problem.train(np.ones(len(problem.names), bool), checkpoints=(0, 50, 100, 150))

        def task_loss(model, k):
            (x, y), _ = problem.data[k]
            return nn.functional.cross_entropy(model(x), y)

        aff = affinities(problem, task_loss, None, states, lr=0.5)
        np.savez(aff_path, **aff)


def collect_modular(extra_masks=None) -> None:
    directory = os.path.join(RUNS, "modular")
    os.makedirs(directory, exist_ok=True)
    problem = Modular(directory)
    problem.w0_state()
    cache = Cache(directory)
    designs = modular_designs(len(problem.names))
    order = [designs["dense"][:40], designs["small"], designs["dense"][40:], designs["all"], designs["alone"]]
    if extra_masks is not None:
        order.append(np.asarray(extra_masks, dtype=bool))
    masks = np.vstack(order)
    aff_path = os.path.join(directory, "affinities.npz")
    if not os.path.exists(aff_path):
        from recipes.modular_arithmetic import finetune
        from dataclasses import replace

        states = [problem.w0_state()]
        model = problem.w0()
        for steps in (20, 40):
            cfg = replace(problem.cfg, finetune_steps=20)
            model = finetune(model, cfg, problem.data, np.ones(25, bool), problem.seed + steps)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        start = time.perf_counter()
        aff = affinities(problem, lambda m, k: problem.task_train_loss(m, k, grad=True), None, states, lr=1e-2)
        np.savez(aff_path, **aff)
        print(f"[modular] affinities in {time.perf_counter() - start:.0f}s", flush=True)
    start, n_new = time.perf_counter(), 0
    for i, mask in enumerate(masks):
        if cache.has(mask):
            continue
        t0 = time.perf_counter()
        losses = problem.train(mask)
        cache.put(mask, losses, time.perf_counter() - t0)
        n_new += 1
        if n_new % 10 == 0:
            print(f"[modular] {i + 1}/{len(masks)} ({n_new} trained now, {time.perf_counter() - start:.0f}s)",
                  flush=True)
    print(f"[modular] {len(masks)} subsets ({n_new} trained now, {time.perf_counter() - start:.0f}s)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problems", nargs="*", default=["planted", "modular"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if "planted" in args.problems:
        collect_planted()
    if "modular" in args.problems:
        collect_modular()


if __name__ == "__main__":
    main()
