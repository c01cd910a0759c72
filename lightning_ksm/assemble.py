"""Every readout of one fitted surrogate, as the report holds it: scores, interactions, best subsets
and co-training groups, each with a bootstrap interval, searched only inside the surrogate's support,
never at an impossible loss, and (when features are available) re-scored with GradEx.

Called by :func:`lightning_ksm.analysis.report_from_losses`; the readouts themselves live in
:mod:`lightning_ksm.readouts`.
"""

from __future__ import annotations

import numpy as np

from ._progress import progress_bar
from .readouts import (
    best_subset,
    bootstrap_readouts,
    cotraining_groups,
    ensemble_design,
    interaction_matrix,
    loo_scores,
    bootstrap_interval,
    support_of,
)
from .readouts.scores import _ensemble_from, _predict2d
from .report.text import left_support_reason

__all__ = ["assemble_readouts", "focus_targets", "default_groups", "withhold_magnitudes", "WITHHELD_METHOD"]

WITHHELD_METHOD = "order"  # the one score method of a report whose magnitudes are withheld

_MAX_INTERACTION_DRAWS = 200_000  # floats per replicate kept for interaction intervals (all targets)
_MAX_FOCUS_INTERACTIONS = 8


def default_groups(K: int) -> int:
    """The default number of co-training groups: about sqrt(K / 2), at least 2."""
    return int(min(K, max(2, round(np.sqrt(K / 2)))))


def focus_targets(task_names, target_names) -> list:
    """The targets a user cares about: the validation groups that are not source tasks and not the
    pooled "all"; when there is none, "all" (or the first target)."""
    tasks = set(task_names)
    out = [t for t in target_names if t not in tasks and t != "all"]
    if out:
        return out
    return ["all"] if "all" in target_names else [target_names[0]]


def _rescore_candidates(found: dict, task_names, target_names, K: int, budget: int):
    """The subsets to re-score with GradEx: the full set and each target's candidates, targets taken
    in order of interest (:func:`focus_targets` first, then the rest) while the distinct subsets fit
    in ``budget`` (a fraction of the main run's subsets: with every source task also a target, all
    candidates would be ``1 + top x (K + 1)`` subsets, more than the main run at large K).
    Returns ``(masks (n, K) bool, the target columns re-scored)``."""
    focus = [target_names.index(n) for n in focus_targets(task_names, target_names)]
    order = focus + [t for t in range(len(target_names)) if t not in focus]
    chosen = {np.ones(K, bool).tobytes(): np.ones(K, bool)}
    rescored = set()
    for t in order:
        if t not in found:
            continue
        new = {m.tobytes(): m for m, _ in found[t].candidates if m.tobytes() not in chosen}
        if len(chosen) + len(new) > budget and rescored:
            continue
        chosen.update(new)
        rescored.add(t)
    return np.array(list(chosen.values())), rescored


def _ok(v, floor) -> bool:
    return v is not None and np.isfinite(v) and v >= floor


def assemble_readouts(surrogate, linear, S, F, task_names, target_names, cfg, *, rescore=None,
                      lower_bound=None, progress: bool = False) -> dict:
    """Readouts and intervals for the report (see the module docstring).

    ``rescore(masks (n, K) bool) -> (n, T)`` losses, e.g. GradEx on those subsets; ``lower_bound``:
    the lowest possible loss (0 for cross-entropy), None when unknown; ``progress``: progress bars
    over the targets' best-subset searches and the bootstrap replicates.
    """
    K, T = len(task_names), len(target_names)
    floor = -np.inf if lower_bound is None else float(lower_bound)
    notes = []
    E = ensemble_design(surrogate, n_samples=cfg.ensemble_samples, seed=cfg.seed)
    ens = _ensemble_from(E, _predict2d(surrogate, E.astype(np.float64)))
    scores = {
        "ensemble": ens.reshape(K, T),
        "loo": np.asarray(loo_scores(surrogate)).reshape(K, T),
        # The linear surrogate's coefficients, as a baseline: -b_k is the loss drop from task k.
        "linear": np.asarray(loo_scores(linear)).reshape(K, T),
    }
    interactions = np.asarray(interaction_matrix(surrogate)).reshape(T, K, K)
    support = support_of(surrogate, cfg.support, cfg.support_radius)
    full = _predict2d(surrogate, np.ones((1, K)))[0]

    # best subsets, inside the support; candidates re-scored with GradEx when possible
    found = {}
    bar = progress_bar(T, progress, "best subsets", "target")
    for t, name in enumerate(target_names):
        if bar is not None:
            bar.update(1)
        try:
            found[t] = best_subset(surrogate, size=cfg.best_subset_size, target=t, max_exact=cfg.max_exact,
                                   seed=cfg.seed, support=support, lower_bound=lower_bound,
                                   top=cfg.rescore_top if rescore is not None else 1)
        except ValueError as exc:
            notes.append(f"no best subset for target {name!r}: {exc}")
    if bar is not None:
        bar.close()
    checked, rescored = None, set()
    if rescore is not None and found:
        cand, rescored = _rescore_candidates(found, task_names, target_names, K,
                                             budget=max(1 + cfg.rescore_top, int(cfg.rescore_budget * len(S))))
        values = np.asarray(rescore(cand), dtype=np.float64).reshape(len(cand), T)
        checked = {c.tobytes(): values[i] for i, c in enumerate(cand)}
        skipped = [target_names[t] for t in found if t not in rescored]
        if skipped:
            notes.append(f"best subsets of {len(skipped)} target(s) ({', '.join(map(repr, skipped[:5]))}"
                         f"{', ...' if len(skipped) > 5 else ''}) are the surrogate's, not re-scored with GradEx: "
                         f"re-scoring is capped at rescore_budget={cfg.rescore_budget} of the {len(S)} subsets")
    best = []
    for t, b in found.items():
        mask, pred = b.mask, b.predicted_loss
        entry = {"target": target_names[t]}
        if checked is not None and t in rescored:
            # the recommendation is the candidate GradEx itself rates best for this target
            # a GradEx value the loss cannot take (a cross-entropy below 0) is neither chosen nor shown
            gx = [float(v) if _ok(v, floor) else None for v in (checked[m.tobytes()][t] for m, _ in b.candidates)]
            i = int(np.nanargmin([np.nan if v is None else v for v in gx])) if any(v is not None for v in gx) else 0
            mask, pred = b.candidates[i]
            full_gx = float(checked[np.ones(K, bool).tobytes()][t])
            entry["gradex_loss"] = gx[i]
            entry["full_set_gradex_loss"] = full_gx if _ok(full_gx, floor) else None
            if any(v is None for v in gx):
                notes.append(f"GradEx put {sum(v is None for v in gx)} best-subset candidate(s) of target "
                             f"{target_names[t]!r} below the lowest possible loss ({floor:g}): not shown, not chosen")
            entry["candidates"] = [
                {"tasks": [task_names[k] for k in np.flatnonzero(m)], "predicted_loss": float(v),
                 "gradex_loss": g} for (m, v), g in zip(b.candidates, gx)]
        entry.update({
            "size": int(mask.sum()),
            "tasks": [task_names[k] for k in np.flatnonzero(mask)],
            "predicted_loss": float(pred),
            "full_set_loss": float(full[t]) if _ok(full[t], floor) else None,
            "exact": b.exact,
            "support": b.support,
        })
        if b.outside is not None:
            om, ov = b.outside
            left = {
                "tasks": [task_names[k] for k in np.flatnonzero(om)], "size": int(om.sum()),
                "distance": int(support.distance(om[None])[0]),
                "outside_evidence": not bool(support.contains(om[None])[0]),
                "predicted_loss": float(ov) if _ok(ov, floor) else None,
            }
            left["note"] = f"the search found a lower prediction {left_support_reason(left)}; it is not recommended"
            entry["left_support"] = left
        best.append((entry, mask))

    # co-training groups (every source task is also a target)
    groups = []
    if all(name in target_names for name in task_names):
        cols = np.array([target_names.index(name) for name in task_names])
        extra = [target_names.index(n) for n in focus_targets(task_names, target_names) if n in target_names
                 and n not in task_names and n != "all"]
        try:
            found_groups = cotraining_groups(
                surrogate, cfg.n_groups or default_groups(K), target_columns=cols, extra_columns=extra,
                seed=cfg.seed, ensemble_samples=cfg.ensemble_samples, support=support, lower_bound=lower_bound,
                max_exact=cfg.max_exact_groupings)
        except ValueError as exc:
            found_groups = []
            notes.append(f"co-training groups could not be chosen: {exc}")
        for g in found_groups:
            groups.append(({
                "tasks": [task_names[i] for i in g.tasks],
                "predicted_loss": g.predicted_loss,
                "serves": [target_names[c] for c in g.serves],
                "served_losses": dict(zip([target_names[c] for c in g.serves], g.served_losses)),
                # a value the loss cannot take is never shown (None)
                "member_losses": {task_names[i]: (v if _ok(v, floor) else None)
                                  for i, v in zip(g.tasks, g.member_losses)},
                "all_tasks_loss": g.all_tasks_loss if _ok(g.all_tasks_loss, floor) else None,
            }, np.isin(np.arange(K), g.tasks), [int(c) for c in g.serves]))
    else:
        notes.append(
            "co-training groups need every source task to also be a target (the same task ids in "
            "the target data); they were skipped"
        )

    intervals = {}
    if cfg.n_bootstrap > 0:
        intervals = _intervals(surrogate, linear, S, F, E, cfg, best, groups, target_names, task_names, floor,
                               scores, interactions, progress)
    return {
        "scores": scores,
        "interactions": interactions,
        "best_subsets": [e for e, _ in best],
        "groups": [e for e, _, _ in groups],
        "intervals": intervals,
        "support": support.describe(),
        "notes": notes,
    }


def _intervals(surrogate, linear, S, F, E, cfg, best, groups, target_names, task_names, floor, scores,
               interactions, progress=False) -> dict:
    K, T = len(task_names), len(target_names)
    level = cfg.interval_level
    focus = [target_names.index(n) for n in focus_targets(task_names, target_names)]
    if "all" in target_names:
        focus.append(target_names.index("all"))
    inter_cols = list(range(T)) if T * K * K <= _MAX_INTERACTION_DRAWS // 4 else \
        sorted(set(focus))[:_MAX_FOCUS_INTERACTIONS]
    queries = [np.ones(K, bool)] + [m for _, m in best] + [m for _, m, _ in groups]
    draws = bootstrap_readouts(surrogate, S, F, n_boot=cfg.n_bootstrap, level=level, seed=cfg.seed,
                               ensemble_subsets=E, queries=np.array(queries), interaction_columns=inter_cols,
                               progress=progress)
    lin = bootstrap_readouts(linear, S, F, n_boot=cfg.n_bootstrap, level=level, seed=cfg.seed, readouts=("loo",))
    out = {
        "level": level, "n_bootstrap": cfg.n_bootstrap, "seed": cfg.seed,
        "about": "percentile bootstrap over the fitted subsets (hyperparameters fixed); it covers the "
                 "surrogate's estimation noise, not the error of the outcomes themselves",
        "scores": {},
    }
    for name, d in (("ensemble", draws.ensemble), ("loo", draws.loo), ("linear", lin.loo)):
        lo, hi = bootstrap_interval(d.reshape(len(d), K, T), scores[name], level)
        out["scores"][name] = {"lo": lo, "hi": hi}
    # how often each task keeps its rank above the next one (the default method's order)
    ens = draws.ensemble.reshape(len(draws.ensemble), K, T)
    point = scores["ensemble"]
    above = np.full((K, T), np.nan)
    for t in range(T):
        order = np.argsort(-point[:, t], kind="stable")
        for a, b in zip(order[:-1], order[1:]):
            above[a, t] = float(np.mean(ens[:, a, t] > ens[:, b, t]))
    out["scores"]["ensemble"]["p_above_next"] = above
    if draws.interactions is not None:
        lo, hi = bootstrap_interval(draws.interactions, interactions[inter_cols], level)
        out["interactions"] = {"targets": [target_names[c] for c in inter_cols], "lo": lo, "hi": hi}
    Qd = draws.queries  # (B, Q, T)
    Qp = _predict2d(surrogate, np.array(queries, dtype=np.float64))  # the point predictions
    full_d, full_p = Qd[:, 0], Qp[0]
    for q, (entry, _) in enumerate(best, start=1):
        t = target_names.index(entry["target"])
        lo, hi = bootstrap_interval(Qd[:, q, t], Qp[q, t], level)
        entry["predicted_interval"] = [max(float(lo), floor), max(float(hi), floor)]
        gain = full_d[:, t] - Qd[:, q, t]
        glo, ghi = bootstrap_interval(gain, full_p[t] - Qp[q, t], level)
        entry["improvement_interval"] = [float(glo), float(ghi)]
        entry["p_better_than_all"] = float(np.mean(gain > 0))
    base = 1 + len(best)
    for g, (entry, _, served) in enumerate(groups):
        if not served:
            continue
        v = Qd[:, base + g][:, served].mean(axis=1)
        lo, hi = bootstrap_interval(v, Qp[base + g, served].mean(), level)
        entry["predicted_interval"] = [max(float(lo), floor), max(float(hi), floor)]
        gain = full_d[:, served].mean(axis=1) - v
        entry["p_better_than_all"] = float(np.mean(gain > 0))
    return out


def withhold_magnitudes(report, reason: str):
    """The same report with every magnitude in loss units withheld, for an estimate that does not
    follow the watched run (:mod:`lightning_ksm.estimation.selfcheck`): the scores become one method,
    ``"order"`` (K for the task ranked most helpful by the default method, down to 1: an order, not a
    loss), interactions, intervals and the estimated subset losses are dropped, and every loss of the
    best subsets and groups is None. ``fit_quality["withheld"]`` says why and what."""
    from .report import AttributionReport

    K = len(report.task_names)
    sc = report.scores[report.default_method]
    order = np.zeros_like(sc)
    for t in range(sc.shape[1]):
        key = np.where(np.isnan(sc[:, t]), np.inf, -sc[:, t])
        order[np.argsort(key, kind="stable"), t] = np.arange(K, 0, -1)
    loss_keys = ("predicted_loss", "full_set_loss", "gradex_loss", "full_set_gradex_loss", "served_losses",
                 "member_losses", "all_tasks_loss")
    drop = ("predicted_interval", "improvement_interval", "candidates", "left_support")

    def blank(entry):
        out = {k: v for k, v in entry.items() if k not in drop}
        out.update({k: None for k in loss_keys if k in entry})
        return out

    fq = dict(report.fit_quality)
    fq["withheld"] = {"reason": reason, "what": ["scores in loss units (the 'order' method replaces them)",
                                                 "interactions", "intervals", "estimated subset losses (losses.npy)",
                                                 "predicted losses of best subsets and groups"]}
    out = AttributionReport(
        task_names=report.task_names, target_names=report.target_names, scores={WITHHELD_METHOD: order},
        default_method=WITHHELD_METHOD, interactions=None, best_subsets=[blank(e) for e in report.best_subsets],
        groups=[blank(g) for g in report.groups], fit_quality=fq, intervals={}, subsets=report.subsets, losses=None,
        config=report.config, seeds=report.seeds, timings=report.timings, versions=report.versions,
        created_at=report.created_at)
    out.surrogate_, out.linear_surrogate_ = report.surrogate_, report.linear_surrogate_
    return out
