"""The Markdown tables of docs/results.md for a Meta-World results file of ``recipes/mt10_sac.py``.

Run: ``python benchmarks/mt10_tables.py benchmarks/results/mt10_10tasks.json`` (prints; the docs
quote its output).
"""

from __future__ import annotations

import json
import sys

import numpy as np

ROWS = [
    ("kernel", "KernelSM: kernel surrogate on GradEx (the method)"),
    ("linear", "linear surrogate on GradEx"),
    ("gradex_direct", "GradEx estimates themselves"),
    ("critic_targets_kernel", "same, critic-gradient targets (kernel; secondary)"),
    ("baseline_target_in_subset", "trivial: target in s"),
    ("baseline_minus_size", "trivial: -\\|s\\|"),
    ("seed_vs_seed", "noise ceiling: one seed's real F vs the other's"),
    ("seed_vs_rest", "noise ceiling: a seed vs the mean of the others"),
]


def _f(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}"


def tables(path: str) -> str:
    d = json.load(open(path))
    tasks = d["config"]["tasks"]
    short = [t.replace("-v3", "").replace("button-press-topdown", "button-press") for t in tasks]
    out = ["| estimate of F(s) | " + " | ".join(short) + " | **mean** | all |",
           "|---|" + "---:|" * (len(tasks) + 2)]
    for key, label in ROWS:
        row = d["lds"].get(key)
        if row is None:
            continue
        per = [row["per_target"].get(t) for t in tasks]
        out.append(f"| {label} | " + " | ".join(_f(v) for v in per)
                   + f" | **{_f(row['mean_over_tasks'])}** | {_f(row.get('all'))} |")
    sel = d["task_selection"]
    # the seed noise of one run's return on each task: sd of (seed a - seed b) / sqrt(2) over the
    # evaluation subsets (from the ground truth's two seeds)
    per_seed = [np.asarray(v, float) for v in d.get("true_returns_per_seed", {}).values()]
    noise = (np.std(per_seed[0] - per_seed[1], axis=0) / np.sqrt(2)) if len(per_seed) >= 2 else None
    out += ["", "| target | KernelSM partners | KernelSM | linear | random (mean of "
            f"{next(iter(sel['per_target'].values()))['random_partner_sets']} triples) | KernelSM - random | "
            "seed noise sd of one run |", "|---|---|---:|---:|---:|---:|---:|"]
    for j, (t, r) in enumerate(sel["per_target"].items()):
        partners = ", ".join(p.replace("-v3", "") for p in r["kernel_partners"])
        sd = "–" if noise is None else f"{noise[tasks.index(t)]:.1f}"
        out.append(f"| {t.replace('-v3', '')} | {partners} | {r['kernel_return']:.1f} | {r['linear_return']:.1f} | "
                   f"{r['random_return']:.1f} | {r['kernel_return'] - r['random_return']:+.1f} | {sd} |")
    m = sel["mean"]
    out.append(f"| **mean** | | **{m['kernel_return']:.1f}** | **{m['linear_return']:.1f}** | **{m['random_return']:.1f}** "
               f"| {m['kernel_return'] - m['random_return']:+.1f} | |")
    b = d["budget"]
    out += ["", f"Budget: {b['results_cpu_s'] / 60:.0f} CPU-minutes ({b['results_wall_s'] / 60:.0f} wall-minutes of runs), "
            f"{b['real_sac_runs']} real SAC runs, {b['env_steps_total']:,} env steps; torch {b['torch_threads']} thread."]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/mt10_10tasks.json"))
