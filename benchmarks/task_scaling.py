"""Scale in tasks (issue 12, item 5): the whole analysis with K source tasks and a target per task.

For K in {10, 100, 300} (``--tasks``): synthetic harvested features (logistic outputs, k = 64,
20 source samples and 10 target samples per task, a few label-flipped tasks), the default
:class:`~lightning_ksm.AnalysisConfig` (200 subsets, bootstrap intervals, co-training groups), and
the wall time of every stage: GradEx, the surrogate, and inside the readouts the best-subset
searches (one per target), the co-training groups and the bootstrap intervals.

Baseline in the same run: the best-subset search of the previous implementation (every candidate
built and passed to ``predict``; ``MoveScorer`` switched off) on the first ``--baseline-targets``
targets, against the incremental move scorer on the same targets (same result, checked). At
K = 300 the baseline is not run (one target would take minutes); the file says so.

The feature store's manifest cost (issue 12: 3,000 shards took 173 s) is measured too: the time
to write N small shards, for N in ``--shards``.

Threads pinned to 1. Wall and CPU seconds are both recorded (the machine is shared: CPU seconds
are the cost, wall seconds what a user waited). Results: ``benchmarks/results/task_scaling.json``; per-K results are cached
under ``runs/task_scaling/`` so that an interrupted run resumes.

Run: ``OMP_NUM_THREADS=1 python benchmarks/task_scaling.py``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import write_results  # noqa: E402

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "task_scaling")


def features(K: int, seed: int = 0):
    from lightning_ksm import HarvestedFeatures

    rng = np.random.default_rng(seed)
    k, n_src, n_tgt = 64, 20, 10
    w = rng.normal(size=k)
    shift = 0.3 * rng.normal(size=(K, k))
    tid = np.repeat(np.arange(K), n_src)
    J = rng.normal(size=(len(tid), k)) + shift[tid]
    y = ((J @ w + rng.normal(size=len(tid))) > 0).astype(float)
    flipped = np.arange(max(1, K // 20))  # a few harmful tasks: their labels are flipped
    y[np.isin(tid, flipped)] = 1.0 - y[np.isin(tid, flipped)]
    names = [f"task{t:03d}" for t in range(K)]
    src = HarvestedFeatures(0.1 * rng.normal(size=len(tid)), J, y, tid, names, "logistic")
    ttid = np.repeat(np.arange(K), n_tgt)
    Jt = rng.normal(size=(len(ttid), k)) + shift[ttid]
    tgt = HarvestedFeatures(np.zeros(len(ttid)), Jt, ((Jt @ w) > 0).astype(float), ttid, names, "logistic")
    return src, tgt


class _Timed:
    """Wraps the readout functions the analysis calls, summing their wall time by name."""

    def __init__(self):
        self.seconds: dict = {}
        self.cpu_seconds: dict = {}
        self.calls: dict = {}

    def wrap(self, module, name: str, label: str):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + time.process_time() - cpu
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(module, name, timed)
        return original


def run_k(K: int, baseline_targets: int) -> dict:
    import lightning_ksm.assemble as assemble
    from lightning_ksm import AnalysisConfig, analyze
    from lightning_ksm.readouts import best_subset, selection, support_of

    src, tgt = features(K)
    timer = _Timed()
    originals = {name: timer.wrap(assemble, name, label) for name, label in
                 (("best_subset", "best_subsets"), ("cotraining_groups", "groups"),
                  ("bootstrap_readouts", "bootstrap_intervals"))}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        report = analyze(src, tgt, AnalysisConfig(), progress=False)
    finally:
        for name, fn in originals.items():
            setattr(assemble, name, fn)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {"K": K, "targets": len(report.target_names), "n_subsets": AnalysisConfig().n_subsets,
           "total_s": total, "total_cpu_s": total_cpu, "stages_s": {k: float(v) for k, v in report.timings.items()},
           "readout_parts_s": timer.seconds, "readout_parts_cpu_s": timer.cpu_seconds, "readout_calls": timer.calls,
           "best_subsets_exact": sum(bool(b["exact"]) for b in report.best_subsets)}

    # baseline: the generic search (candidates built, predict called) on a few targets
    if baseline_targets and K <= 100:
        cfg = AnalysisConfig()
        sur = report.surrogate_
        sup = support_of(sur, cfg.support, cfg.support_radius)
        kw = dict(size=cfg.best_subset_size, max_exact=cfg.max_exact, seed=cfg.seed, support=sup, lower_bound=0.0,
                  top=cfg.rescore_top)
        cols = list(range(min(baseline_targets, len(report.target_names))))
        t0 = time.process_time()
        fast = [best_subset(sur, target=c, **kw) for c in cols]
        fast_s = time.process_time() - t0
        applies = selection.MoveScorer.applies
        selection.MoveScorer.applies = staticmethod(lambda s: False)
        try:
            t0 = time.process_time()
            slow = [best_subset(sur, target=c, **kw) for c in cols]
            slow_s = time.process_time() - t0
        finally:
            selection.MoveScorer.applies = applies
        out["baseline"] = {
            "targets": len(cols), "incremental_cpu_s": fast_s, "generic_cpu_s": slow_s, "speedup": slow_s / fast_s,
            "same_recommendations": all(np.array_equal(a.mask, b.mask) for a, b in zip(fast, slow)),
            "max_abs_difference": float(max(abs(a.predicted_loss - b.predicted_loss) for a, b in zip(fast, slow))),
            "exact": [bool(a.exact) for a in fast],
        }
    elif baseline_targets:
        out["baseline"] = {"note": "not run at this K: the generic search takes minutes per target"}
    return out


def store_cost(n_shards: int) -> dict:
    from lightning_ksm.store import FeatureStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        store = FeatureStore(d)
        store.initialize(projector_config={"kind": "synthetic", "k": 8}, mode="margin", params={"w": (8,)},
                         task_names=["a", "b"])
        start = time.perf_counter()
        marks = {}
        for i in range(n_shards):
            store.write_shard("source", i, outputs=rng.normal(size=4), jacobians=rng.normal(size=(4, 8)),
                              labels=rng.normal(size=4), task_ids=np.array([0, 1, 0, 1]))
            if i + 1 in (n_shards // 4, n_shards // 2, n_shards):
                marks[i + 1] = time.perf_counter() - start
        t0 = time.perf_counter()
        store.load("source")
        load_s = time.perf_counter() - t0
        # baseline: the same arrays written as plain .npy files (the data alone, no manifest, no checks)
        plain = os.path.join(d, "plain")
        os.makedirs(plain)
        t0 = time.perf_counter()
        for i in range(n_shards):
            for name, arr in (("outputs", rng.normal(size=4)), ("jacobians", rng.normal(size=(4, 8))),
                              ("labels", rng.normal(size=4)), ("task_ids", np.array([0, 1, 0, 1]))):
                np.save(os.path.join(plain, f"{i}-{name}.npy"), arr)
        plain_s = time.perf_counter() - t0
    return {"shards": n_shards, "write_s": marks[n_shards], "cumulative_write_s": marks, "load_s": load_s,
            "plain_npy_write_s": plain_s, "ratio_to_plain": marks[n_shards] / plain_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 300])
    ap.add_argument("--baseline-targets", type=int, default=2)
    ap.add_argument("--shards", type=int, nargs="*", default=[300, 1000, 3000])
    ap.add_argument("--fresh", action="store_true", help="ignore the per-K cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(CACHE, exist_ok=True)
    rows = []
    for K in args.tasks:
        path = os.path.join(CACHE, f"K{K}.json")
        if os.path.exists(path) and not args.fresh:
            row = json.load(open(path))
        else:
            row = run_k(K, args.baseline_targets)
            json.dump(row, open(path, "w"), indent=1)
        print(f"K={K}: {row['total_s']:.1f} s wall, {row['total_cpu_s']:.1f} s CPU ({json.dumps({k: round(v, 1) for k, v in row['stages_s'].items()})}; "
              f"readout parts {json.dumps({k: round(v, 1) for k, v in row['readout_parts_s'].items()})})", flush=True)
        rows.append(row)
    stores = [store_cost(n) for n in args.shards]
    for s in stores:
        print(f"store: {s['shards']} shards written in {s['write_s']:.1f} s ({s['ratio_to_plain']:.1f}x plain .npy), "
              f"loaded in {s['load_s']:.1f} s", flush=True)
    payload = {"command": "OMP_NUM_THREADS=1 python benchmarks/task_scaling.py " + " ".join(argv or sys.argv[1:]),
               "threads": 1, "analysis": rows, "store": stores,
               "note": "synthetic features (k = 64, 20 source / 10 target samples per task); a target per task "
                       "plus 'all'; default AnalysisConfig. Wall times on a shared 2-core machine."}
    write_results("task_scaling", payload)
    return payload


if __name__ == "__main__":
    main()
