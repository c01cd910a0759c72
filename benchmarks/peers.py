"""Peers side by side (issue #13): the field's attribution methods at the task level, scored against
the same real-retraining ground truth as KernelSM.

Problems (benchmarks/_peers_problems.py): the 10-source project with planted harmful / helpful
sources and the modular-arithmetic recipe (both operations), whose real retrainings
benchmarks/gradex_fidelity.py cached under ``runs/gradex_fidelity/`` (never retrained here), and a
task-level breast-cancer (Figure 1) problem whose exact refits are computed here.

Methods: dattri's TRAK, TracIn, Grad-Dot, Grad-Cos and influence functions (explicit, CG, LiSSA,
Arnoldi, DataInf, EK-FAC) through one task-level aggregation (benchmarks/_peers_dattri.py);
Kronfluence's EK-FAC and KFAC with its damping sweep, aggregated the same way
(benchmarks/_peers_kronfluence.py); the task-level classics (linear datamodel on real retrainings,
leave-one-out retraining, gradient-cosine affinity, TAG's lookahead affinity) and KernelSM / GradEx
as users get them: the callback's default features (preconditioned by the run's Adam second
moments, exact target readout) analysed with ``AnalysisConfig()`` (``simulate``,
``calibrate="effect"`` on the watched run's observed all-tasks loss) (benchmarks/_peers_classics.py).

Scoring, the same for every row: a method with task scores ``a`` (> 0: the task helps, the
project's sign convention) predicts ``F^(s) = -sum_{k in s} a_k`` (removing a helpful task raises the
loss); surrogates predict F^(s) directly. **LDS** = Spearman of F^ and the real F (mean over batch
seeds) over the evaluation subsets (one target: the mean target loss); **within size** = the same
with |s| partialled out; **LOO** = Spearman of the task scores (or the predicted F(1 - e_k) - F(1))
with the real leave-one-out effects, where the design has them. Any "best of a sweep" is chosen on
the tuning subsets only. Rows ``minus_size`` (F^ = -|s|) and ``noise_ceiling`` (seed-to-seed
agreement of the real outcomes) are in every table.

Command (2 shared cores, one thread; per-method results cached under ``runs/peers/``):

    OMP_NUM_THREADS=1 TQDM_DISABLE=1 nice -n 5 .venv/bin/python benchmarks/peers.py

writes ``benchmarks/results/peers.json``; ``--tables`` prints the docs' tables from it.
``--no-ours --no-write`` is a partial pass (the peers only, nothing written but the cache): the
full command afterwards reuses every cached row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import partial_spearman, spearman, write_results  # noqa: E402
from _peers_classics import PeakRSS, grad_cos_affinity, gradex_default, kernelsm, watched_run  # noqa: E402
from _peers_problems import PROBLEMS, load_problem  # noqa: E402

ROOT = os.path.join("runs", "peers")
# the 422k-parameter transformer, dattri's CPU path: a short list (the time budget of this pass:
# TRAK took 60-120 s per projection, Grad-Dot / Grad-Cos ~130-150 s, TracIn ~370 s; TRAK 2048 and the
# IF solvers left out: dattri's EK-FAC was stopped after 7.5 min on addition without finishing in an
# earlier pass; this pass's cache was lost and the rerun had ~1.5 h of one shared core for everything)
MODULAR_METHODS = ["trak_p128", "trak_p512", "grad_dot", "grad_cos", "tracin"]
MODULAR_QUAD_METHODS = ["trak_p128", "trak_p512", "grad_dot", "grad_cos", "tracin"]
# per-sample budgets: (attributed training samples per task, target samples, Hessian samples, methods)
BUDGETS = {
    "project": dict(n_per_task=None, n_targets=None, n_hessian=512, only=None),
    "breast_cancer": dict(n_per_task=None, n_targets=None, n_hessian=455, only=None),
    # the 422k-parameter transformer: 16 samples per task (400 of 8468), 256 of 941 targets, and a
    # shortened list (one TRAK projection took 85-100 s here, dattri's CPU projector being dense
    # Gaussian: 2048 dims, CG, LiSSA, Arnoldi left out)
    "modular_add": dict(n_per_task=16, n_targets=256, n_hessian=256, only=MODULAR_METHODS),
    "modular_quad": dict(n_per_task=16, n_targets=256, n_hessian=256, only=MODULAR_QUAD_METHODS),
}


# -- metrics ---------------------------------------------------------------------------------------
_spearman = spearman  # the shared metrics of benchmarks/_common.py


def score_prediction(p, pred, loo_pred=None) -> dict:
    """``pred``: F^ on every design row; ``loo_pred``: predicted LOO effects (K,) or None."""
    truth, size = p.truth, p.S.sum(1)
    out = {"lds": _spearman(pred[p.ev], truth[p.ev]),
           "within_size": partial_spearman(pred[p.ev], truth[p.ev], size[p.ev]),
           "tuning_lds": _spearman(pred[p.fit], truth[p.fit])}
    if p.loo is not None and loo_pred is not None:
        out["loo_spearman"] = _spearman(loo_pred, truth[p.loo] - truth[p.full])
    return out


def _add_per_sample_rows(rows: dict, p, res: dict, family: str) -> None:
    """One row per per-sample method run (task scores by sum), plus its ``_mean`` aggregation."""
    for name, r in res.items():
        base = {"family": family, "seconds": r["seconds"], "hyper": r["hyper"], "budget": r["info"],
                "peak_rss_extra_bytes": r.get("peak_rss_extra_bytes")}
        if r["scores"] is None:
            rows[name] = {**base, "error": r["info"]["error"]}
            continue
        rows[name] = {**score_tasks(p, r["scores"]["sum"]), **base, "task_scores": r["scores"]["sum"]}
        rows[name + "_mean"] = {**score_tasks(p, r["scores"]["mean"]), **base, "aggregation": "mean",
                                "task_scores": r["scores"]["mean"]}


def score_tasks(p, a) -> dict:
    a = np.asarray(a, dtype=np.float64)
    return score_prediction(p, -(p.S @ a), a)


def noise_ceiling(p) -> dict | None:
    R = p.F_seeds.shape[0]
    if R < 2:
        return {"note": "deterministic refits: no seed noise, the ceiling is 1"}
    F, ev, size = p.F_seeds, p.ev, p.S.sum(1)
    pairs = [(i, j) for i in range(R) for j in range(i + 1, R)]
    rho = float(np.mean([_spearman(F[i, ev], F[j, ev]) for i, j in pairs]))
    within = float(np.mean([partial_spearman(F[i, ev], F[j, ev], size[ev]) for i, j in pairs]))
    out = {"seed_to_seed_lds": rho, "seed_to_seed_within_size": within, "n_batch_seeds": R,
           "lds": float(np.sqrt(max(R * rho / (1 + (R - 1) * rho), 0))) if rho > 0 else 0.0,
           "within_size": float(np.sqrt(max(R * within / (1 + (R - 1) * within), 0))) if within > 0 else 0.0,
           "note": "lds / within_size: Spearman-Brown expected agreement of a perfect predictor with the "
                   "mean of the R seeds; seed_to_seed_*: one seed against another"}
    if p.loo is not None:
        eff = F[:, p.loo] - F[:, [p.full]]
        out["seed_to_seed_loo"] = float(np.mean([_spearman(eff[i], eff[j]) for i, j in pairs]))
        r = out["seed_to_seed_loo"]
        out["loo_spearman"] = float(np.sqrt(max(R * r / (1 + (R - 1) * r), 0))) if r > 0 else 0.0
    return out


# -- caching ---------------------------------------------------------------------------------------
class Cache(dict):
    def __init__(self, path):
        super().__init__(json.load(open(path)) if os.path.exists(path) else {})
        self.path = path

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self, fh)
        os.replace(tmp, self.path)

    def timed(self, name, fn):
        if name not in self:
            with PeakRSS() as mem:
                t = time.perf_counter()
                val = fn()
                sec = time.perf_counter() - t
            self[name] = {"value": val, "seconds": sec, "peak_rss_extra_bytes": mem.extra_bytes}
        return self[name]


# -- one problem -----------------------------------------------------------------------------------
def run_problem(p, budget: dict, cache_dir: str, log=print, tag_every: int = 1, tag_targets=None,
                n_checkpoints: int = 5, kronfluence=None, ours: bool = True) -> dict:
    """``kronfluence``: False (not run), None (the default sweep) or run_kronfluence's keywords;
    ``ours``: False leaves out the KernelSM / GradEx rows (a partial pass, cached rows kept)."""
    from _peers_dattri import run_per_sample

    from lightning_ksm.surrogates import KernelSurrogate, LinearSurrogate

    cache = Cache(os.path.join(cache_dir, "rows.json"))
    rows, t_all = {}, time.perf_counter()
    rows["minus_size"] = {**score_prediction(p, -p.S.sum(1).astype(float),
                                             -np.ones(p.K) if p.loo is not None else None),
                          "family": "trivial", "seconds": 0.0,
                          "note": "F^ = -|s|: more tasks = lower loss (LOO: every task helps equally)"}
    rows["noise_ceiling"] = {**(noise_ceiling(p) or {}), "family": "ceiling"}
    n_rand = len(p.fit)
    # classics on real retrainings
    for name, est in (("linear_datamodel", LinearSurrogate()), ("kernel_datamodel", KernelSurrogate())):
        m = est.fit(p.S[p.fit].astype(float), p.truth[p.fit])
        pred = np.asarray(m.predict(p.S.astype(float))).ravel()
        loo = pred[p.loo] - pred[p.full] if p.loo is not None else None
        rows[name] = {**score_prediction(p, pred, loo), "family": "real retraining",
                      "seconds": p.retrain_seconds * n_rand * p.F_seeds.shape[0],
                      "budget": f"{n_rand} tuning subsets x {p.F_seeds.shape[0]} seed(s) really retrained",
                      "note": "fitted on the tuning half's real F (seed mean); seconds = those retrainings"}
        if name == "linear_datamodel":
            rows[name]["task_scores"] = (-np.asarray(m.coef_).ravel()).tolist()
    if p.loo is not None:
        F0 = p.F_seeds[0]
        a = F0[p.loo] - F0[p.full]
        other = p.F_seeds[1:].mean(0) if p.F_seeds.shape[0] > 1 else p.truth
        sc = score_tasks(p, a)
        sc["loo_spearman"] = _spearman(a, other[p.loo] - other[p.full])
        rows["loo_retraining"] = {**sc, "family": "real retraining", "task_scores": a.tolist(),
                                  "seconds": p.retrain_seconds * (p.K + 1),
                                  "budget": f"{p.K + 1} retrainings (all tasks + K leave-one-out), batch seed 0",
                                  "note": "LOO Spearman against the other batch seeds' mean (against the same "
                                          "seeds it would be 1 by construction)" if p.F_seeds.shape[0] > 1 else
                                          "deterministic refits: LOO Spearman is 1 by construction"}
    # gradient-cosine affinity
    for where, state in (("w0", p.w0), ("final", p.final)):
        if state is None:
            continue
        r = cache.timed(f"grad_cos_affinity_{where}", lambda state=state: grad_cos_affinity(p, state).tolist())
        rows[f"grad_cos_affinity_{where}"] = {**score_tasks(p, r["value"]), "family": "task-level classic",
                                             "task_scores": r["value"], "seconds": r["seconds"],
                                             "peak_rss_extra_bytes": r["peak_rss_extra_bytes"],
                                             "note": f"cos(task's mean loss gradient, target gradient) at {where}"}
    # the watched run replayed: TAG + TracIn checkpoints
    ckpts = None
    if p.train_loop is not None:
        path = os.path.join(cache_dir, "watched_run.pt")
        if os.path.exists(path):
            tag, ckpts, extra = torch.load(path, weights_only=False)
        else:
            t = time.perf_counter()
            with PeakRSS() as mem:
                tag, ckpts = watched_run(p, tag_every=tag_every, n_target=tag_targets, n_checkpoints=n_checkpoints)
            extra = mem.extra_bytes
            os.makedirs(cache_dir, exist_ok=True)
            torch.save((tag, ckpts, extra), path)
            log(f"[{p.name}] watched run replayed ({time.perf_counter() - t:.0f}s, replay diff "
                f"{tag['replay_max_abs_diff_vs_recorded_final']:.2e})")
        rows["tag_lookahead"] = {**score_tasks(p, tag["tag"]), "family": "task-level classic",
                                 "task_scores": tag["tag"], "seconds": tag["tag_seconds"],
                                 "peak_rss_extra_bytes": extra,
                                 "replay": {k: v for k, v in tag.items() if k != "tag"},
                                 "note": "TAG: 1 - L_target(optimizer lookahead on the task's batch samples) / "
                                         "L_target, mean over the watched run's steps; seconds = the lookaheads"}
    # KernelSM and GradEx (the project's own); cached per feature set (the cache files they were read from)
    if p.features is not None and ours:
        SP = p.S.astype(bool)
        variant = "@" + "+".join(p.notes["gradex_features_keys"]) if p.notes.get("gradex_features_keys") else ""

        def ksm():
            pred, report = kernelsm(p, SP)
            return {"pred": pred.tolist(), "gamma": getattr(report.surrogate_, "gamma_", None),
                    "alpha": getattr(report.surrogate_, "alpha_", None)}
        r = cache.timed("kernelsm" + variant, ksm)
        pred = np.asarray(r["value"]["pred"])
        loo = pred[p.loo] - pred[p.full] if p.loo is not None else None
        rows["kernelsm"] = {**score_prediction(p, pred, loo), "family": "ours", "seconds": r["seconds"],
                            "peak_rss_extra_bytes": r["peak_rss_extra_bytes"],
                            "hyper": {"gamma": r["value"]["gamma"], "alpha": r["value"]["alpha"]},
                            "features": p.notes.get("gradex_features"),
                            "note": "lightning_ksm.analyze(source, target, AnalysisConfig()) on the harvested "
                                    "features (harvest time not included), its kernel surrogate predicting the "
                                    "design subsets"}
        r = cache.timed("gradex_default" + variant, lambda: gradex_default(p, SP).tolist())
        pred = np.asarray(r["value"])
        loo = pred[p.loo] - pred[p.full] if p.loo is not None else None
        rows["gradex_default"] = {**score_prediction(p, pred, loo), "family": "ours", "seconds": r["seconds"],
                                  "peak_rss_extra_bytes": r["peak_rss_extra_bytes"],
                                  "features": p.notes.get("gradex_features"),
                                  "note": "GradEx's F^ (the default estimator) on the design subsets directly"}
    # dattri
    log(f"[{p.name}] dattri methods")
    dcache = Cache(os.path.join(cache_dir, "dattri.json"))
    res = run_per_sample(p, checkpoints=ckpts, log=log, cache=dcache, **budget)
    _add_per_sample_rows(rows, p, res, "dattri")
    # Kronfluence (EK-FAC, KFAC), the same samples, targets and aggregation as the dattri rows
    from _peers_kronfluence import available, run_kronfluence

    why = available()
    if why is None and kronfluence is not False:
        log(f"[{p.name}] kronfluence")
        kcache = Cache(os.path.join(cache_dir, "kronfluence.json"))
        kbudget = {k: v for k, v in budget.items() if k != "only"}
        res = run_kronfluence(p, cache=kcache, log=log, workdir=os.path.join(cache_dir, "kronfluence_work"),
                              **kbudget, **(kronfluence or {}))
        _add_per_sample_rows(rows, p, res, "kronfluence")
    elif why is not None:
        log(f"[{p.name}] kronfluence not run: {why}")
    return {"rows": rows, "best_of_sweeps": best_of_sweeps(rows), "notes": p.notes, "K": p.K,
            "n_subsets": int(len(p.S)), "n_tuning": int(len(p.fit)), "n_evaluation": int(len(p.ev)),
            "seconds_one_real_retraining": p.retrain_seconds, "wall_seconds": time.perf_counter() - t_all,
            "real_loo_effects": (p.truth[p.loo] - p.truth[p.full]).tolist() if p.loo is not None else None}


def _family(name: str) -> str:
    base = name[:-5] if name.endswith("_mean") else name
    for pre in ("trak", "if_explicit", "if_cg", "if_lissa", "if_arnoldi", "if_datainf", "if_ekfac", "kf_ekfac",
                "kf_kfac"):
        if base.startswith(pre):
            return pre + ("_mean" if name.endswith("_mean") else "")
    return name


def best_of_sweeps(rows: dict) -> dict:
    """Per swept family, the setting with the best tuning-half LDS (never the evaluation half)."""
    fams = {}
    for name, r in rows.items():
        if "tuning_lds" in r:
            fams.setdefault(_family(name), []).append((r["tuning_lds"], name))
    return {f: max(v)[1] for f, v in fams.items() if len(v) > 1}


# -- tables ----------------------------------------------------------------------------------------
TITLES = {"project": "Project (10 sources, planted harmful 0, 1 and helpful 2, 3)",
          "breast_cancer": "Breast cancer, 10 k-means tasks (exact refits)",
          "modular_add": "Modular addition (25 tasks)", "modular_quad": "Modular quadratic (25 tasks)"}


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.2f}"


def format_tables(results: dict, full: bool = False) -> str:
    lines = []
    for prob, res in results["problems"].items():
        rows, best = res["rows"], res["best_of_sweeps"]
        show = list(rows) if full else [n for n in rows if not n.endswith("_mean") and
                                        (_family(n) == n or best.get(_family(n), n) == n)]
        lines += [f"**{TITLES.get(prob, prob)}** ({res['n_tuning']} tuning / {res['n_evaluation']} evaluation "
                  f"subsets; one real retraining ~{res['seconds_one_real_retraining']:.2g} s)", "",
                  "| method | family | LDS | within size | LOO | seconds |", "|---|---|---:|---:|---:|---:|"]
        for n in show:
            r = rows[n]
            label = f"**{n}**" if n == "kernelsm" else n
            if _family(n) != n and not full and _family(n) in best:
                label += " (best on tuning)"
            if n == "noise_ceiling" and "lds" not in r:
                lines.append(f"| noise_ceiling | ceiling | 1 (exact refits) | 1 | 1 | – |")
                continue
            if "error" in r:
                lines.append(f"| {label} | {r['family']} | failed: {r['error'][:60]} | | | {r['seconds']:.1f} |")
                continue
            lines.append(f"| {label} | {r['family']} | {_fmt(r.get('lds'))} | {_fmt(r.get('within_size'))} | "
                         f"{_fmt(r.get('loo_spearman'))} | {_fmt(r.get('seconds'))} |")
        lines.append("")
    return "\n".join(lines)


def _shown(res, name):
    """The row of ``name`` in the headline: a swept family is shown by its best-on-tuning setting."""
    best = res["best_of_sweeps"]
    if name in best or name in res["rows"]:
        return best.get(name, name)
    ok = [n for n in res["rows"] if _family(n) == name and "error" not in res["rows"][n]]
    return ok[0] if len(ok) == 1 else None  # a family with one setting run


def format_headline(results: dict) -> str:
    """One table over the problems: LDS / within size / LOO (where the design has it) and seconds."""
    probs = [p for p in ("project", "breast_cancer", "modular_add", "modular_quad") if p in results["problems"]]
    order = []
    for p in probs:
        for n in results["problems"][p]["rows"]:
            fam = _family(n)
            if not fam.endswith("_mean") and fam not in order:
                order.append(fam)
    short = {"project": "project", "breast_cancer": "breast cancer", "modular_add": "mod. add",
             "modular_quad": "mod. quad"}
    head = "| method | " + " | ".join(f"{short[p]}: LDS / within / LOO" for p in probs) + " | seconds (" + \
        ", ".join(short[p] for p in probs) + ") |"
    lines = [head, "|---|" + "---:|" * (len(probs) + 1)]
    for fam in order:
        cells, secs = [], []
        label = fam
        for p in probs:
            res = results["problems"][p]
            name = _shown(res, fam)
            r = res["rows"].get(name) if name else None
            if r is None:
                failed = [n for n in res["rows"] if _family(n) == fam]
                cells.append("failed" if failed else "not run")
                secs.append("–")
                continue
            if name != fam:
                label = f"{fam} (best on tuning)"
            if fam == "noise_ceiling" and "lds" not in r:
                cells.append("1 / 1 / 1 (exact)")
                secs.append("–")
                continue
            if "error" in r:
                cells.append("failed")
                secs.append(_fmt(r.get("seconds")))
                continue
            loo = f" / {_fmt(r.get('loo_spearman'))}" if res["rows"]["minus_size"].get("loo_spearman") is not None else ""
            cells.append(f"{_fmt(r.get('lds'))} / {_fmt(r.get('within_size'))}{loo}")
            secs.append("–" if fam == "noise_ceiling" else f"{r.get('seconds', 0):.3g}")
        bold = "**" if fam == "kernelsm" else ""
        lines.append(f"| {bold}{label}{bold} | " + " | ".join(cells) + " | " + ", ".join(secs) + " |")
    return "\n".join(lines)


def format_sweep(results: dict, prefixes=("kf_ekfac", "kf_kfac")) -> str:
    """Every setting of the Kronfluence sweeps (sum aggregation): tuning LDS (what picks the best),
    then the evaluation LDS / within size / LOO."""
    probs = [p for p in ("project", "breast_cancer", "modular_add", "modular_quad") if p in results["problems"]]
    lines = ["| problem | setting | tuning LDS | LDS | within size | LOO | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    short = {"project": "project", "breast_cancer": "breast cancer", "modular_add": "mod. add",
             "modular_quad": "mod. quad"}
    for p in probs:
        res = results["problems"][p]
        ms, nc = res["rows"]["minus_size"], res["rows"]["noise_ceiling"]
        lines.append(f"| {short[p]} | minus_size (-\\|s\\|) | {_fmt(ms.get('tuning_lds'))} | {_fmt(ms.get('lds'))} | "
                     f"{_fmt(ms.get('within_size'))} | {_fmt(ms.get('loo_spearman'))} | 0 |")
        lines.append(f"| {short[p]} | noise_ceiling | – | " + (" | ".join(_fmt(nc.get(k)) for k in (
            "lds", "within_size", "loo_spearman")) if "lds" in nc else "1 (exact refits) | 1 | 1") + " | – |")
        for n, r in res["rows"].items():
            if n.endswith("_mean") or not n.startswith(prefixes):
                continue
            star = " (best)" if res["best_of_sweeps"].get(_family(n)) == n else ""
            if "error" in r:
                lines.append(f"| {short[p]} | {n} | failed: {r['error'][:50]} | | | | |")
                continue
            lines.append(f"| {short[p]} | {n}{star} | {_fmt(r.get('tuning_lds'))} | {_fmt(r.get('lds'))} | "
                         f"{_fmt(r.get('within_size'))} | {_fmt(r.get('loo_spearman'))} | {r['seconds']:.3g} |")
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    ap.add_argument("--tables", metavar="RESULTS_JSON")
    ap.add_argument("--full", action="store_true", help="with --tables: every row of every sweep")
    ap.add_argument("--memory-gb", type=int, default=10, help="address-space limit of this process")
    ap.add_argument("--no-ours", action="store_true", help="leave out KernelSM / GradEx (a partial pass; "
                    "rows cached under runs/peers/ are reused by the next full run)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/peers.json")
    args = ap.parse_args(argv)
    if args.tables:
        res = json.load(open(args.tables))
        print(format_headline(res) + "\n\n" + format_sweep(res) + "\n\n" + format_tables(res, full=args.full))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import resource  # a shared machine: a method that needs more memory fails (and is recorded) instead

    resource.setrlimit(resource.RLIMIT_AS, (args.memory_gb << 30, resource.RLIM_INFINITY))
    start = time.perf_counter()

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    out = {}
    for name in args.problems:
        t = time.perf_counter()
        p = load_problem(name)
        log(f"[{name}] problem loaded ({time.perf_counter() - t:.0f}s)")
        tag_targets = 256 if name.startswith("modular") else None
        out[name] = run_problem(p, BUDGETS[name], os.path.join(ROOT, name), log=log, tag_targets=tag_targets,
                                n_checkpoints=3 if name.startswith("modular") else 5, ours=not args.no_ours)
        out[name]["budget_per_sample_methods"] = BUDGETS[name]
        print(format_tables({"problems": {name: out[name]}}), flush=True)
    results = {
        "command": "OMP_NUM_THREADS=1 TQDM_DISABLE=1 nice -n 5 .venv/bin/python benchmarks/peers.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "dattri_version": _version("dattri"),
        "scoring": "F^(s) = -sum of the scores of the tasks in s (score > 0: the task helps); LDS = Spearman over "
                   "the evaluation subsets against the real F (mean over batch seeds); within_size = partial "
                   "Spearman with |s| partialled out; loo_spearman = task scores vs real F(1 - e_k) - F(1); any "
                   "best-of-sweep chosen by tuning_lds (the tuning subsets)",
        "memory": "peak_rss_extra_bytes: peak resident memory above the level when the method started, sampled "
                  "every 10 ms (torch's CPU tensors are invisible to tracemalloc)",
        "seeds": {"per_sample_subsampling": 0, "targets_hessian_subsampling": 1, "projections": 0},
        "kronfluence": {
            "version": _version("kronfluence"),
            "install": "pip install -c .venv/constraints.txt kronfluence (torch stays 2.13.0+cpu); it pulls torchvision "
                       "0.28.0, which does not import with this CPU torch; kronfluence's own modules (analyzer, "
                       "arguments, task) do not import torchvision (checked: not in sys.modules after importing "
                       "them), and its rows ran here with torchvision absent",
            "api": "Analyzer(cpu=True).fit_all_factors(FactorArguments(strategy=ekfac|kfac)) on the Hessian samples, "
                   "compute_pairwise_scores(ScoreArguments(damping_factor=...)), load_pairwise_scores; a Task with the "
                   "summed cross-entropy / BCE as training loss (labels sampled from the model for the true Fisher) "
                   "and as measurement; every nn.Linear tracked",
            "damping_sweep": "None (Kronfluence's heuristic: 0.1 x the mean eigenvalue), 1e-8 (its default), 1e-5, 1e-3, "
                             "1e-1; best chosen by tuning_lds; every setting is a row (kf_<strategy>_d<damping>)",
            "aggregation": "exactly as the dattri rows: the same attributed samples, targets and Hessian samples "
                           "(budget_per_sample_methods), benchmarks/_peers_dattri.aggregate (sum, *_mean rows: mean)",
        },
        "not_run": {
            "dattri_other": "RPS, DVEmb, LoGra, FactGraSS, BlockProjectedIF and KNN-Shapley are not rows (the issue "
                            "names TRAK, TracIn, influence functions, Grad-Dot/Grad-Cos)",
            "modular_shortened": "the per-method cache of the previous pass was lost and this rerun had about 1.5 h of "
                                 "one shared CPU core (another benchmark on the other) for everything: on the "
                                 "422k-parameter transformer only the dattri methods in budget_per_sample_methods.only "
                                 "ran (both operations: TRAK 128 / 512, Grad-Dot, Grad-Cos, TracIn; 60-370 s each). "
                                 "Not run on modular: TRAK 2048 and every dattri influence-function solver (its EK-FAC "
                                 "at damping 0.1 was stopped after 7.5 min on addition without finishing in the "
                                 "previous pass; CG, LiSSA, Arnoldi, DataInf not started). Kronfluence's EK-FAC / KFAC "
                                 "ran on both operations (about 2 min per operation for the whole sweep)",
        },
        "problems": out,
        "total_wall_seconds_this_invocation": time.perf_counter() - start,
    }
    if not args.no_write:
        write_results("peers", results)
    print(format_tables(results))


if __name__ == "__main__":
    main()
