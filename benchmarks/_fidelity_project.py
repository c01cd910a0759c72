"""A multi-source classification project like a user's, for benchmarks/gradex_fidelity.py.

K = 10 sources of 4-class data in 16 input dimensions, labelled by one fixed teacher network; each
source has its own input shift. Planted: sources 0 and 1 are **harmful** (their labels are
scrambled by a fixed permutation of the classes, their inputs near the target's), sources 2 and 3 are **helpful** (drawn
from the target's own input distribution), the other six are shifted away from it. The target
(validation) set is clean data from the target distribution. W0: an MLP 16-64-64-4 pretrained for
3 epochs on a small generic pool; the watched run: 5 epochs of Adam (lr 2e-3, batch 64) on the
union of the selected sources, reshuffled every epoch (epoch-based: more data, more steps).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["ProjectProblem", "make_project", "HARMFUL", "HELPFUL"]

HARMFUL = (0, 1)
HELPFUL = (2, 3)
K, DIM, C, N_PER, N_TARGET = 10, 16, 4, 300, 1000
EPOCHS, BATCH, LR = 5, 64, 2e-3


def _mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, C))


class ProjectProblem:
    """Data, W0 and the training function ``train(subset, seed) -> {"all": target loss}``."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(70_000 + seed)
        teacher = _mlp(80_000 + seed)
        for p in teacher.parameters():
            p.data.mul_(3.0)

        def label(x):
            with torch.no_grad():
                return teacher(x).argmax(1)

        xs, ys, ts = [], [], []
        shifts = 1.2 * torch.randn(K, DIM, generator=g)
        shifts[list(HELPFUL)] = 0.0
        shifts[list(HARMFUL)] *= 0.3  # near the target distribution: their wrong labels conflict with it
        perm = torch.tensor([1, 2, 3, 0])
        for t in range(K):
            x = torch.randn(N_PER, DIM, generator=g) + shifts[t]
            y = label(x)
            if t in HARMFUL:
                y = perm[y]
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((N_PER,), t))
        self.x, self.y, self.task = torch.cat(xs), torch.cat(ys), torch.cat(ts)
        self.x_target = torch.randn(N_TARGET, DIM, generator=g)
        self.y_target = label(self.x_target)
        pool = torch.randn(400, DIM, generator=g) * 1.5
        self.task_names = [f"source{t}" for t in range(K)]
        model = _mlp(90_000 + seed)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        yp = label(pool)
        gp = torch.Generator().manual_seed(95_000 + seed)
        for _ in range(3):
            order = torch.randperm(len(pool), generator=gp)
            for b in range(0, len(pool), BATCH):
                idx = order[b:b + BATCH]
                loss = nn.functional.cross_entropy(model(pool[idx]), yp[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def model(self) -> nn.Module:
        m = _mlp(0)
        m.load_state_dict(self.w0)
        return m

    def target_loss(self, model) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(self.x_target), self.y_target))

    def fit(self, subset, seed: int):
        """The watched run's training on the selected sources; returns (model, optimizer, steps)."""
        keep = torch.as_tensor(np.asarray(subset, dtype=bool))[self.task]
        idx_all = torch.nonzero(keep).flatten()
        model = self.model()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(99_000 + seed)
        steps = 0
        model.train()
        for _ in range(EPOCHS):
            order = idx_all[torch.randperm(len(idx_all), generator=g)]
            for b in range(0, len(order), BATCH):
                idx = order[b:b + BATCH]
                loss = nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        model.eval()
        return model, opt, steps

    def __call__(self, subset, seed: int) -> dict:
        model, _, _ = self.fit(subset, seed)
        return {"all": self.target_loss(model)}

    def batches(self, split: str, size: int = 256):
        x, y, t = (self.x, self.y, self.task) if split == "source" else (
            self.x_target, self.y_target, torch.zeros(len(self.x_target), dtype=torch.long))
        for b in range(0, len(x), size):
            yield x[b:b + size], y[b:b + size], t[b:b + size].tolist()


def make_project(seed: int = 0) -> ProjectProblem:
    return ProjectProblem(seed)


def project_design(seed: int, n_random: int = 60, p: float = 0.8) -> np.ndarray:
    """The retrained subsets: all sources, the K leave-one-out subsets, then ``n_random`` distinct
    Bernoulli(``p``) subsets (seeded)."""
    from lightning_ksm.subsets import sample_subsets

    full = np.ones((1, K), dtype=bool)
    loo = ~np.eye(K, dtype=bool)
    seen = {r.tobytes() for r in np.vstack([full, loo])}
    rand = [r for r in sample_subsets(K, 4 * n_random, p=p, seed=71_000 + seed, unique=True)
            if r.tobytes() not in seen and r.sum() >= 1][:n_random]
    return np.vstack([full, loo, np.array(rand, dtype=bool)])


def project_truth(seed: int, n_batch_seeds: int, root: str, log=print, n_random: int = 60) -> dict:
    """Real F of every design subset for every batch seed (cached under ``root``)."""
    import os

    from lightning_ksm.retrain import retrain_subsets

    prob = make_project(seed)
    S = project_design(seed, n_random)
    reals = []
    for r in range(n_batch_seeds):
        bs = 100 * seed + r
        res = retrain_subsets(prob, S, directory=os.path.join(root, f"seed{seed}", f"retrain-b{bs}"), seed=bs,
                              task_names=prob.task_names)
        log(f"[project seed {seed}] batch seed {bs}: {res.n_trained} trained now, {res.training_seconds:.0f}s in all")
        reals.append(res)
    return {"problem": prob, "subsets": S, "reals": reals}
