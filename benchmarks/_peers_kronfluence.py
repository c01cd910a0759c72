"""Kronfluence's EK-FAC and KFAC influence (Grosse et al. 2023) through its public API, aggregated to
tasks exactly as the dattri rows (benchmarks/_peers_dattri.py: same attributed samples, same targets,
same ``aggregate``).

Kronfluence's pairwise score of a training sample and a query is ``g_query^T (G + damping)^-1 g_train``
with the measurement and the training loss both the per-sample loss: > 0 means the training sample
lowers the query's loss (it helps), the sign convention of dattri's inner-product attributors and of
the project. The factors (covariances, eigendecompositions, EK-FAC's corrected eigenvalues) are
fitted once per strategy on the same Hessian samples as dattri's solvers (the true Fisher: labels
sampled from the model, Kronfluence's default); the damping sweep reuses them. Kronfluence's own
damping choices are swept: its heuristic (``damping_factor=None``: 0.1 x the mean eigenvalue), its
default 1e-8, and 1e-5, 1e-3, 1e-1.

Kronfluence approximates only the modules it supports (``nn.Linear``, ``nn.Conv2d``); the others
(embeddings, LayerNorms) are left out of its scores, as in its own examples.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["available", "run_kronfluence", "DAMPINGS"]

DAMPINGS = (None, 1e-8, 1e-5, 1e-3, 1e-1)  # None: Kronfluence's heuristic (0.1 x mean eigenvalue)


def available() -> str | None:
    """None when kronfluence imports, else why not."""
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"{type(e).__name__}: {e}"
    return None


def _task_class(kind: str, modules):
    from kronfluence.task import Task

    def logits(model, batch):
        x, _ = batch
        return model(x)

    class _T(Task):
        def compute_train_loss(self, batch, model, sample=False):
            z = logits(model, batch)
            y = batch[1]
            if kind == "bce":
                z = z[:, 0]
                if sample:
                    with torch.no_grad():
                        y = torch.bernoulli(torch.sigmoid(z.detach()))
                return nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="sum")
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(z.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(z, y.long(), reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return modules

    return _T()


def _label(damping) -> str:
    return "heur" if damping is None else f"{damping:g}"


def run_kronfluence(problem, *, n_per_task=None, n_targets=None, n_hessian=512, seed=0, strategies=("ekfac", "kfac"),
                    dampings=DAMPINGS, cache=None, log=print, workdir="runs/peers/kronfluence", batch=64,
                    only=None, **_):
    """``{row name: {"scores", "seconds", "peak_rss_extra_bytes", "hyper", "info"}}``, the rows of
    run_per_sample's format. ``seconds`` of a row: its scores plus its strategy's factors."""
    import copy

    from _peers_classics import PeakRSS
    from _peers_dattri import aggregate, sample_positions

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    pos, scale = sample_positions(problem.task, problem.K, n_per_task, seed)
    rng = np.random.default_rng(seed + 1)  # the same target / Hessian samples as run_per_sample
    tpos = np.arange(len(problem.y_target)) if n_targets is None or n_targets >= len(problem.y_target) else \
        np.sort(rng.choice(len(problem.y_target), n_targets, replace=False))
    hpos = np.sort(rng.choice(len(problem.y), min(n_hessian, len(problem.y)), replace=False))
    base = copy.deepcopy(problem.model)
    base.load_state_dict(problem.final)
    base.eval()
    modules = [n for n, m in base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    task = _task_class(problem.loss_kind, modules)
    model = prepare_model(base, task)
    train = TensorDataset(problem.x[pos], problem.y[pos])
    query = TensorDataset(problem.x_target[tpos], problem.y_target[tpos])
    fit = TensorDataset(problem.x[hpos], problem.y[hpos])
    out = {}
    todo = [(s, d) for s in strategies for d in dampings
            if (only is None or f"kf_{s}_d{_label(d)}" in only)]
    if cache is not None and all(f"kf_{s}_d{_label(d)}" in cache for s, d in todo):
        return {f"kf_{s}_d{_label(d)}": cache[f"kf_{s}_d{_label(d)}"] for s, d in todo}
    wd = os.path.abspath(workdir)
    shutil.rmtree(wd, ignore_errors=True)
    analyzer = Analyzer(analysis_name=problem.name, model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=wd)
    info = {"n_train_attributed": int(len(pos)), "n_targets": int(len(tpos)), "n_hessian": int(len(hpos)),
            "n_per_task": n_per_task, "modules": modules, "error": None}
    for strategy in strategies:
        names = [f"kf_{strategy}_d{_label(d)}" for d in dampings]
        if cache is not None and all(n in cache for n in names):
            out.update({n: cache[n] for n in names})
            continue
        with PeakRSS() as mem:
            t = time.perf_counter()
            err = None
            try:
                torch.manual_seed(seed)  # the sampled labels of the true Fisher
                analyzer.fit_all_factors(factors_name=strategy, dataset=fit, per_device_batch_size=batch,
                                         factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
            except Exception as e:  # recorded, not hidden
                err = f"{type(e).__name__}: {e}"[:400]
            factor_seconds = time.perf_counter() - t
        factor_peak = mem.extra_bytes
        log(f"  kronfluence {strategy} factors: {factor_seconds:.1f}s" + (f" ({err})" if err else ""))
        for d, name in zip(dampings, names):
            if cache is not None and name in cache:
                out[name] = cache[name]
                continue
            hyper = {"strategy": strategy, "damping_factor": "heuristic (0.1 x mean eigenvalue)" if d is None else d,
                     "modules": "every nn.Linear (Kronfluence's supported modules)", "fisher": "true (sampled labels)"}
            A, e2, sec, peak = None, err, 0.0, factor_peak
            if err is None:
                with PeakRSS() as mem:
                    t = time.perf_counter()
                    try:
                        analyzer.compute_pairwise_scores(
                            scores_name=f"{strategy}_{_label(d)}", factors_name=strategy, query_dataset=query,
                            train_dataset=train, per_device_query_batch_size=len(query),
                            per_device_train_batch_size=batch, score_args=ScoreArguments(damping_factor=d),
                            overwrite_output_dir=True)
                        M = analyzer.load_pairwise_scores(f"{strategy}_{_label(d)}")["all_modules"]
                        A = M.detach().double().numpy().T  # (train, query)
                    except Exception as e:
                        e2 = f"{type(e).__name__}: {e}"[:400]
                    sec = time.perf_counter() - t
                peak = max(peak, mem.extra_bytes)
            inf = dict(info, error=e2, seconds_factors=factor_seconds, seconds_scores=sec)
            scores = aggregate(A, np.asarray(problem.task)[pos], problem.K, scale) if A is not None and \
                np.all(np.isfinite(A)) else None
            if A is not None and scores is None:
                inf["error"] = "non-finite attributions"
            out[name] = {"scores": None if scores is None else {k: v.tolist() for k, v in scores.items()},
                         "seconds": factor_seconds + sec, "peak_rss_extra_bytes": peak, "hyper": hyper, "info": inf}
            log(f"  {name}: {sec:.1f}s scores" + (f" ({inf['error']})" if inf["error"] else ""))
            if cache is not None:
                cache[name] = out[name]
    shutil.rmtree(wd, ignore_errors=True)
    return out
