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

The feature store's bookkeeping cost is measured too (issue 12: 3,000 shards took 173 s when every
shard rewrote a manifest listing all shards; format 3 writes one record file per shard): the time
to write N small shards, for N in ``--shards``, against the same arrays written as plain ``.npy``
files and as durable ones (temporary file, fsync, rename: what the store does per file).
``--store-only`` runs just that part and rewrites only the ``store`` entry of the results file.

Threads pinned to 1. Wall and CPU seconds are both recorded (the machine is shared: CPU seconds
are the cost, wall seconds what a user waited). Results: ``benchmarks/results/task_scaling.json``; per-K results are cached
under ``runs/task_scaling/`` so that an interrupted run resumes.

Run: ``OMP_NUM_THREADS=1 python benchmarks/task_scaling.py`` (``--store-only --shards 300 1000 3000``: the store part)
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


def store_cost(n_shards: int, repeats: int = 3) -> dict:
    """Write ``n_shards`` small shards; wall and CPU seconds (CPU: the bookkeeping, which a busy box
    distorts less than wall time, where fsync waits dominate), per shard early and late, and the
    same arrays as plain and as durable .npy files. Each figure is the minimum over ``repeats``
    runs (the least noisy on a shared machine)."""
    from lightning_ksm.fileio import atomic_save_npy
    from lightning_ksm.store import FORMAT_VERSION, FeatureStore

    rng = np.random.default_rng(0)
    q, h = n_shards // 4, n_shards // 2

    def shard_arrays():
        return (("outputs", rng.normal(size=4)), ("jacobians", rng.normal(size=(4, 8))),
                ("labels", rng.normal(size=4)), ("task_ids", np.array([0, 1, 0, 1])))

    def files(save, folder):  # the baselines: the same arrays, no store
        os.makedirs(folder)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n_shards):
            for name, arr in shard_arrays():
                save(os.path.join(folder, f"{i}-{name}.npy"), arr)
        return time.perf_counter() - t0, time.process_time() - c0

    def once() -> dict:
        with tempfile.TemporaryDirectory() as d:
            store = FeatureStore(d)
            store.initialize(projector_config={"kind": "synthetic", "k": 8}, mode="margin", params={"w": (8,)},
                             task_names=["a", "b"])
            start, cpu = time.perf_counter(), time.process_time()
            out = {}
            for i in range(n_shards):
                store.write_shard("source", i, **dict(shard_arrays()))
                if i + 1 in (q, h, n_shards):
                    out[f"write_s@{i + 1}"] = time.perf_counter() - start
                    out[f"write_cpu_s@{i + 1}"] = time.process_time() - cpu
            t0 = time.perf_counter()
            store.load("source")
            out["load_s"] = time.perf_counter() - t0
            out["plain_npy_write_s"], out["plain_npy_write_cpu_s"] = files(np.save, os.path.join(d, "plain"))
            # as the store writes each file: a temporary name, fsync, rename
            out["durable_npy_write_s"], out["durable_npy_write_cpu_s"] = files(atomic_save_npy,
                                                                               os.path.join(d, "durable"))
        return out

    runs = [once() for _ in range(repeats)]
    m = {k: min(r[k] for r in runs) for k in runs[0]}

    def per_shard(kind):  # from each run's own marks, then the minimum
        return {"first_quarter": min(1e3 * r[f"{kind}@{q}"] / q for r in runs),
                "last_half": min(1e3 * (r[f"{kind}@{n_shards}"] - r[f"{kind}@{h}"]) / (n_shards - h) for r in runs)}

    wall, cpu = m[f"write_s@{n_shards}"], m[f"write_cpu_s@{n_shards}"]
    return {"shards": n_shards, "format_version": FORMAT_VERSION, "repeats": repeats, "write_s": wall,
            "write_cpu_s": cpu, "ms_per_shard": per_shard("write_s"), "cpu_ms_per_shard": per_shard("write_cpu_s"),
            "load_s": m["load_s"], "plain_npy_write_s": m["plain_npy_write_s"],
            "plain_npy_write_cpu_s": m["plain_npy_write_cpu_s"], "ratio_to_plain": wall / m["plain_npy_write_s"],
            "cpu_ratio_to_plain": cpu / m["plain_npy_write_cpu_s"], "durable_npy_write_s": m["durable_npy_write_s"],
            "durable_npy_write_cpu_s": m["durable_npy_write_cpu_s"],
            "ratio_to_durable": wall / m["durable_npy_write_s"], "cpu_ratio_to_durable": cpu / m["durable_npy_write_cpu_s"],
            "runs": runs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 300])
    ap.add_argument("--baseline-targets", type=int, default=2)
    ap.add_argument("--shards", type=int, nargs="*", default=[300, 1000, 3000])
    ap.add_argument("--fresh", action="store_true", help="ignore the per-K cache")
    ap.add_argument("--store-repeats", type=int, default=3, help="store part: minimum over this many runs")
    ap.add_argument("--store-only", action="store_true",
                    help="run only the store part; rewrite only the 'store' entry of the results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 python benchmarks/task_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.store_only:
        return store_only(args.shards, command, args.store_repeats)
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
    stores = run_stores(args.shards, args.store_repeats)
    payload = {"command": command, "threads": 1, "analysis": rows, "store": stores, "store_command": command,
               "note": "synthetic features (k = 64, 20 source / 10 target samples per task); a target per task "
                       "plus 'all'; default AnalysisConfig. Wall times on a shared 2-core machine."}
    write_results("task_scaling", payload)
    return payload


def run_stores(shards, repeats: int) -> list:
    stores = []
    for n in shards:
        s = store_cost(n, repeats)
        print(f"store: {s['shards']} shards written in {s['write_s']:.1f} s wall ({s['ratio_to_plain']:.1f}x plain .npy, "
              f"{s['ratio_to_durable']:.1f}x durable .npy), {s['write_cpu_s']:.1f} s CPU ({s['cpu_ratio_to_plain']:.1f}x, "
              f"{s['cpu_ratio_to_durable']:.1f}x); CPU ms per shard {s['cpu_ms_per_shard']['first_quarter']:.2f} in the "
              f"first quarter, {s['cpu_ms_per_shard']['last_half']:.2f} in the last half; loaded in {s['load_s']:.1f} s",
              flush=True)
        stores.append(s)
    return stores


def store_only(shards, command: str, repeats: int) -> dict:
    """The store part alone: the results file keeps its analysis rows, its 'store' entry is replaced."""
    from benchmarks._common import RESULTS

    path = RESULTS / "task_scaling.json"
    payload = json.loads(path.read_text()) if path.exists() else {"benchmark": "task_scaling"}
    payload["store"] = run_stores(shards, repeats)
    payload["store_command"] = command
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path} (store entry only)")
    return payload


if __name__ == "__main__":
    main()
