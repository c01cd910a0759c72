"""Co-training groups and best subsets judged by real training (the task-grouping protocol; paper
Table 4 for selection).

For each problem (``benchmarks/grouping_data.py``: ``planted``, K = 8, every subset really trained;
``modular``, K = 25 grid cells of modular arithmetic, p = 97, ``quad``) and at most ``n`` groups:

(a) every task alone, (b) all tasks together, (c) the recommended groups (kernel surrogate fitted on
real outcomes of a few sampled subsets, :func:`lightning_ksm.readouts.cotraining_groups`), (d) random
groupings with the recommended groups' sizes, (e) groups chosen through the same search from
gradient-cosine affinities and from TAG's lookahead affinities (Fifty et al., 2021), (f) the
exhaustive optimum over the real outcomes (planted only). Reported: the mean over tasks of the real
target loss of the group serving each task (lower is better).

Best subsets: per target, the recommended subset (inside the surrogate's support) against random
subsets of the same size, all tasks, and all tasks without the planted harmful task.

    python benchmarks/grouping_data.py                 # the trainings (resumable, runs/grouping/)
    python benchmarks/task_grouping.py                 # trains the groupings it needs, writes
                                                       # benchmarks/results/task_grouping.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import write_results  # noqa: E402
from benchmarks.grouping_data import RUNS, Cache, Modular, Planted, modular_designs  # noqa: E402
from lightning_ksm import KernelSurrogate, sample_subsets  # noqa: E402
from lightning_ksm.readouts import best_subset, cotraining_groups, select_groups  # noqa: E402
from lightning_ksm.subsets import all_subsets  # noqa: E402


def affinity_losses(A: np.ndarray):
    """Group 'losses' from an affinity A[s, t] (s helps t): minus the mean affinity onto t from
    the group's other members (0 alone), so that the shared search maximizes affinity."""

    def f(masks):
        M = masks.astype(np.float64)
        onto = M @ A - M * np.diag(A)[None, :]  # sum over other members s of A[s, t]
        n_other = M.sum(axis=1, keepdims=True) - M
        return np.where(n_other > 0, -onto / np.maximum(n_other, 1), 0.0)

    return f


def served_losses(masks, serving, real) -> np.ndarray:
    """Per task the real own-target loss of the group serving it."""
    return np.array([real(masks[serving[k]])[k] for k in range(len(serving))])


def grouping_from(masks, K, rank):
    """Each task served by the member group that ``rank(mask)[k]`` rates best (lower)."""
    masks = np.asarray(masks, dtype=bool)
    vals = np.array([rank(m) for m in masks])
    vals = np.where(masks, vals, np.inf)
    return masks, np.argmin(vals, axis=0)


def evaluate_problem(name, K, n_groups, real, fit_S, fit_F, affinities, *, n_random, exhaustive_losses=None,
                     harmful=(), subset_targets=None, seed=0):
    """All groupings and best subsets of one problem. ``real(mask) -> (T,)`` real losses (own targets
    first, K columns); ``fit_S``/``fit_F``: the surrogate's training data (real outcomes)."""
    rng = np.random.default_rng(seed)
    sur = KernelSurrogate().fit(fit_S, fit_F)
    out = {"n_groups": n_groups, "n_fit_subsets": int(len(fit_S)),
           "surrogate": {"gamma_times_K": float(sur.gamma_ * K), "alpha": float(sur.alpha_)}}
    rows = {}
    eye = np.eye(K, dtype=bool)
    rows["(a) each task alone"] = {"loss": float(np.mean([real(eye[k])[k] for k in range(K)])), "groups": "singletons"}
    full = np.ones(K, dtype=bool)
    rows["(b) all tasks"] = {"loss": float(np.mean(real(full)[:K])), "groups": "one group"}
    groups = cotraining_groups(sur, n_groups, target_columns=np.arange(K), seed=seed)
    masks = np.array([np.isin(np.arange(K), g.tasks) for g in groups])
    serving = np.full(K, -1)
    for gi, g in enumerate(groups):
        for c in g.serves:
            if c < K:
                serving[c] = gi
    rec = served_losses(masks, serving, real)
    rows["(c) recommended (kernel surrogate)"] = {
        "loss": float(rec.mean()), "groups": [g.tasks for g in groups],
        "predicted": float(np.mean([groups[serving[k]].served_losses[groups[serving[k]].serves.index(k)]
                                    for k in range(K)]))}
    sizes = np.bincount(serving, minlength=len(groups))
    sizes = sizes[sizes > 0]
    rand = []
    for _ in range(n_random):
        perm = rng.permutation(K)
        parts, start = [], 0
        for s in sizes:
            parts.append(np.isin(np.arange(K), perm[start:start + s]))
            start += s
        pm = np.array(parts)
        rand.append(float(served_losses(pm, np.argmax(pm, axis=0), real).mean()))
    rows["(d) random groupings, same sizes"] = {"loss": float(np.mean(rand)), "std": float(np.std(rand)),
                                               "n_draws": n_random, "sizes": sizes.tolist()}
    for label, A in affinities.items():
        sel = select_groups(affinity_losses(A), K, n_groups, seed=seed, max_exact=2_000_000)
        rows[f"(e) {label} affinity"] = {"loss": float(served_losses(sel.masks, sel.serving[:K], real).mean()),
                                         "groups": [np.flatnonzero(m).tolist() for m in sel.masks]}
    if exhaustive_losses is not None:
        sel = select_groups(exhaustive_losses, K, n_groups, max_exact=50_000_000)
        rows["(f) exhaustive optimum (real outcomes)"] = {
            "loss": float(sel.value), "groups": [np.flatnonzero(m).tolist() for m in sel.masks], "exact": sel.exact}
    out["groupings"] = rows

    # best subsets, per target
    subsets = {}
    for t in (subset_targets if subset_targets is not None else range(K)):
        b = best_subset(sur, target=int(t), lower_bound=0.0, seed=seed)
        size = len(b.tasks)
        rs = []
        for _ in range(n_random):
            m = np.zeros(K, dtype=bool)
            m[rng.choice(K, size=size, replace=False)] = True
            rs.append(float(real(m)[t]))
        entry = {"size": size, "tasks": b.tasks, "predicted": b.predicted_loss, "real": float(real(b.mask)[t]),
                 "random_same_size": float(np.mean(rs)), "all_tasks": float(real(full)[t]),
                 "left_support": b.outside is not None}
        if harmful:
            m = full.copy()
            m[list(harmful)] = False
            entry["all_minus_harmful"] = float(real(m)[t])
        subsets[int(t)] = entry
    out["best_subsets"] = subsets
    keys = ["real", "random_same_size", "all_tasks"] + (["all_minus_harmful"] if harmful else [])
    out["best_subsets_mean"] = {k: float(np.mean([e[k] for e in subsets.values()])) for k in keys}
    return out


def planted_problem(n_random: int) -> dict:
    problem = Planted(0)
    K = len(problem.names)
    cache = Cache(os.path.join(RUNS, "planted"))
    table = {m.tobytes(): cache.get(m) for m in all_subsets(K)}
    real = lambda m: table[np.asarray(m, bool).tobytes()]  # noqa: E731
    fit_S = sample_subsets(K, 40, p=0.5, seed=7, unique=True)
    fit_F = np.stack([real(m) for m in fit_S])
    aff = dict(np.load(os.path.join(RUNS, "planted", "affinities.npz")))
    pool = all_subsets(K)
    pool_L = np.stack([real(m) for m in pool])
    index = {m.tobytes(): i for i, m in enumerate(pool)}

    def exhaustive(masks):
        return pool_L[[index[m.tobytes()] for m in masks]]

    out = evaluate_problem("planted", K, 3, real, fit_S, fit_F,
                           {"gradient-cosine": aff["cosine"], "TAG lookahead": aff["tag"]},
                           n_random=n_random, exhaustive_losses=exhaustive, harmful=[problem.names.index("noisy")])
    out["tasks"] = list(problem.names)
    out["budget"] = (f"{len(pool)} real trainings (every subset, {sum(cache.seconds(m) for m in pool):.0f} s), "
                     "of which 40 fit the surrogate; every grouping is read from them")
    return out


def modular_problem(n_random: int) -> dict:
    directory = os.path.join(RUNS, "modular")
    problem = Modular(directory)
    K = len(problem.names)
    cache = Cache(directory)
    trained = {"n": 0, "seconds": 0.0}

    def real(m):
        m = np.asarray(m, dtype=bool)
        if not cache.has(m):
            start = time.perf_counter()
            cache.put(m, problem.train(m), time.perf_counter() - start)
            trained["n"] += 1
            trained["seconds"] += time.perf_counter() - start
        v = cache.get(m)
        return v[941:941 + K + 1]  # per-cell own targets (K), then "all"

    d = modular_designs(K)
    fit_S = np.vstack([d["dense"][:40], d["small"]])
    fit_F = np.stack([real(m) for m in fit_S])
    aff = dict(np.load(os.path.join(directory, "affinities.npz")))
    out = evaluate_problem("modular", K, 4, real, fit_S, fit_F,
                           {"gradient-cosine": aff["cosine"], "TAG lookahead": aff["tag"]},
                           n_random=n_random, subset_targets=[K, 0, 6, 12, 18, 24])
    out["tasks"] = list(problem.names)
    n_cached = len([f for f in os.listdir(directory) if f.endswith(".npz") and f != "affinities.npz"])
    out["budget"] = (f"{n_cached} real fine-tunings of 60 steps in all ({trained['n']} trained by this run, "
                     f"{trained['seconds']:.0f} s); the surrogate was fitted on 70 of them (40 at ratio 0.9, 30 of "
                     "3-12 tasks); pretraining W0 once; no exhaustive optimum (2^25 subsets)")
    return out


def format_tables(payload: dict) -> str:
    """Markdown tables of a results file (as quoted in docs/results.md)."""
    probs = [p for p in ("planted", "modular") if p in payload]
    lines = ["| grouping (mean per-task real target loss, lower is better) | " + " | ".join(probs) + " |",
             "|---|" + "---:|" * len(probs)]
    rows = []
    for p in probs:
        for r in payload[p]["groupings"]:
            if r not in rows:
                rows.append(r)
    for r in rows:
        cells = []
        for p in probs:
            v = payload[p]["groupings"].get(r)
            cells.append("n/a" if v is None else (f"{v['loss']:.4f}" + (f" ± {v['std']:.4f}" if "std" in v else "")))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "| best subsets (mean real target loss over the targets) | " + " | ".join(probs) + " |",
              "|---|" + "---:|" * len(probs)]
    labels = {"real": "recommended subset", "random_same_size": "random subsets of the same size",
              "all_tasks": "all tasks", "all_minus_harmful": "all tasks without the planted harmful task"}
    for k, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{payload[p]['best_subsets_mean'][k]:.4f}" if k in payload[p]["best_subsets_mean"] else "n/a"
            for p in probs) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problems", nargs="*", default=["planted", "modular"])
    parser.add_argument("--random", type=int, default=None, help="random draws (default 20 planted, 2 modular)")
    parser.add_argument("--tables", metavar="RESULTS_JSON", help="print the markdown tables of a results file")
    args = parser.parse_args(argv)
    if args.tables:
        import json

        with open(args.tables) as fh:
            print(format_tables(json.load(fh)))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    payload = {"command": "python benchmarks/task_grouping.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "planted" in args.problems:
        payload["planted"] = planted_problem(args.random or 20)
    if "modular" in args.problems:
        payload["modular"] = modular_problem(args.random or 2)
    payload["seconds_this_run"] = time.perf_counter() - start
    write_results("task_grouping", payload)
    for name in ("planted", "modular"):
        if name in payload:
            print(name)
            for row, v in payload[name]["groupings"].items():
                print(f"  {row:<42} {v['loss']:.4f}  {v.get('groups', '')}")
            print("  best subsets (mean real loss):", payload[name]["best_subsets_mean"])


if __name__ == "__main__":
    main()
