"""``make demo``'s recommendations checked by real retraining.

Runs the demo (the planted problem of ``lightning_ksm.demo.planted`` with the TaskAttribution
callback; cached under ``runs/grouping/demo``), then really fine-tunes from W0 (the demo's own
``train_on_tasks``, 10 epochs, seed 0) on: all tasks; all tasks without the planted harmful task
(``noisy``); the recommended best subset for the target; a random subset of the same size
(10 draws); and the recommended groups, scoring the target with the group that serves it.

    python benchmarks/demo_check.py        # writes benchmarks/results/demo_check.json
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import write_results  # noqa: E402


def main() -> None:
    import torch

    from lightning_ksm import AttributionReport
    from lightning_ksm.demo.planted import TARGET, make_planted_problem, target_loss, train_on_tasks
    from lightning_ksm.demo.run import planted_demo

    torch.set_num_threads(1)
    out = os.path.join(ROOT, "runs", "grouping", "demo")
    report_dir = os.path.join(out, "report")
    start = time.perf_counter()
    if os.path.exists(os.path.join(report_dir, "report.json")):
        report = AttributionReport.load(report_dir)
    else:
        report = planted_demo(out, verify=False, progress=False)
    problem = make_planted_problem(seed=0)
    tasks = list(problem.task_names)

    def real(subset):
        return target_loss(train_on_tasks(problem, subset, epochs=10, seed=0), problem)

    best = next(e for e in report.best_subsets if e["target"] == TARGET)
    rng = np.random.default_rng(0)
    rand = [real(list(rng.choice(tasks, size=len(best["tasks"]), replace=False))) for _ in range(10)]
    serving = next((g for g in report.groups if TARGET in g.get("serves", [])), None)
    payload = {
        "command": "python benchmarks/demo_check.py",
        "target": TARGET,
        "real_target_loss": {
            "all tasks": real(tasks),
            "all tasks without noisy (the planted harmful task)": real([t for t in tasks if t != "noisy"]),
            "recommended best subset": real(best["tasks"]),
            "random subsets of the same size (mean of 10)": float(np.mean(rand)),
            "group serving the target": None if serving is None else real(serving["tasks"]),
        },
        "recommended_best_subset": {k: best.get(k) for k in ("tasks", "predicted_loss", "predicted_interval",
                                                              "gradex_loss", "full_set_gradex_loss")},
        "groups": [{"tasks": g["tasks"], "serves": g.get("serves")} for g in report.groups],
        "synergy_pair_together": any({"pair-a", "pair-b"} <= set(g["tasks"]) for g in report.groups),
        "seconds": time.perf_counter() - start,
    }
    write_results("demo_check", payload)
    for k, v in payload["real_target_loss"].items():
        print(f"{k:<55} {v}")
    print("groups:", payload["groups"], "pair together:", payload["synergy_pair_together"])


if __name__ == "__main__":
    main()
