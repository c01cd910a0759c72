"""What the planted-task recipes on real architectures share (``resnet18_planted``, ``gpt2_planted``).

Each recipe builds K = 4 synthetic tasks, one of them planted harmful, and a W0 that stands in for
pretrained weights; then :func:`run` does the same four steps for both:

1. the **attribution run**: the recipe's Lightning fit with :class:`TaskAttribution` at its defaults;
2. **GradEx on every subset**: F^(s) for all 2^K - 1 subsets from the callback's saved harvest, with
   the callback's own estimator and its recorded run (:func:`gradex_on_subsets`);
3. **real retraining** of every subset from W0 with the same fit, one pass per batch-order seed;
4. **scores** (:func:`score`): where the report and real retraining rank the planted task, Spearman
   of F^ against the real F over the subsets and within subset size, the trivial baseline
   ``F^ = -|s|``, and the noise ceiling (one seed's real F against another's).

With K = 4 every subset is retrained, so nothing is held out and nothing is tuned: the callback runs
at its defaults, and the scores read the whole brute-force table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
import numpy as np
import torch


def plant(labels: torch.Tensor, tasks: torch.Tensor, harmful: int, kind: str, generator) -> torch.Tensor:
    """Binary ``labels`` with the ``harmful`` task's made wrong: ``"flipped"`` (1 - y) or
    ``"scrambled"`` (uniformly random)."""
    if kind == "flipped":
        wrong = 1 - labels
    elif kind == "scrambled":
        wrong = torch.randint(0, 2, labels.shape, generator=generator)
    else:
        raise ValueError(f"planted must be 'flipped' or 'scrambled', got {kind!r}")
    return torch.where(tasks == harmful, wrong, labels)


def trainer(epochs: int, root: str, callbacks=()):
    """The recipes' CPU trainer: no logger, checkpoints, progress bar or sanity validation."""
    import lightning.pytorch as L

    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=root, callbacks=list(callbacks))


def classifier(recipe, cfg, w0: dict):
    """A LightningModule that fine-tunes ``recipe.new_model(w0)`` with Adam (``cfg.lr``) on ``(input,
    label, task)`` batches (cross-entropy of ``recipe.logits(net, input)``); its validation is the
    target. With ``cfg.frozen_norm`` the BatchNorm layers stay in eval mode while training (their
    running statistics frozen, as in detection fine-tuning), so training and harvest see one function."""
    import lightning.pytorch as L

    lr, frozen_norm = cfg.lr, getattr(cfg, "frozen_norm", False)

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = recipe.new_model(w0)

        def on_train_batch_start(self, batch, batch_idx):  # after Lightning set the train modes
            if frozen_norm:
                for m in self.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.eval()

        def forward(self, x):
            return recipe.logits(self.net, x)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y), batch_size=len(y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    return Classifier()


def train_loader(dataset, batch_size: int, seed: int):
    """Shuffled batches in a seeded order (the seed is the retraining's batch-order seed)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(3_000 + seed))


def attribution_run(recipe, cfg, w0: dict, run_dir: str):
    """Fine-tune W0 on all tasks with the callback at its defaults but ``cfg.projection`` (the
    target is the validation loader); returns the callback's report."""
    import lightning.pytorch as L

    from lightning_ksm import TaskAttribution

    train, target = recipe.task_data(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    callback = TaskAttribution(seed=cfg.seed, projection=cfg.projection, dirpath=os.path.join(run_dir, "ksm"),
                               progress=False, raise_on_analysis_error=True, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(cfg.epochs, run_dir, [callback]).fit(classifier(recipe, cfg, w0),
                                                     train_loader(train, cfg.batch_size, cfg.seed),
                                                     torch.utils.data.DataLoader(target, batch_size=256))
    return callback.report


class RetrainSubset:
    """``train_fn(subset, seed)`` for :func:`retrain_subsets`: the attribution run's fit from W0 on
    the subset's tasks only, then the target loss. ``recipe`` is the recipe's module name."""

    def __init__(self, recipe: str, cfg, w0_path: str, root: str):
        self.recipe, self.cfg, self.w0_path, self.root = recipe, cfg, w0_path, root

    def __call__(self, subset, seed: int) -> dict:
        from importlib import import_module

        from lightning_ksm.retrain import select_samples

        recipe, cfg = import_module(self.recipe), self.cfg
        train, target = recipe.task_data(cfg)
        keep = select_samples(train.tensors[2].numpy(), subset)
        module = classifier(recipe, cfg, torch.load(self.w0_path, weights_only=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(cfg.epochs, self.root).fit(module, train_loader(torch.utils.data.Subset(train, keep),
                                                                    cfg.batch_size, seed))
        module.eval()
        x, y, _ = target.tensors
        with torch.no_grad():
            return {"all": float(torch.nn.functional.cross_entropy(module(x), y))}


def gradex_on_subsets(ksm_dir: str, S: np.ndarray) -> np.ndarray:
    """F^ of the target ``"all"`` on the rows of ``S`` (columns in task order 0..K-1), from the
    callback's harvest and run record, with the estimator the callback itself used."""
    from lightning_ksm.analysis import present_tasks_only
    from lightning_ksm.config import AnalysisConfig
    from lightning_ksm.estimation import estimate_subsets
    from lightning_ksm.store import FeatureStore

    store = FeatureStore(os.path.join(ksm_dir, "harvest"))
    source, target = present_tasks_only(store.load("source")), present_tasks_only(store.load("target"))
    cols = [int(n) for n in source.task_names]  # the store's task order
    with open(os.path.join(ksm_dir, "run.json"), encoding="utf-8") as fh:
        run_record = json.load(fh)
    with open(os.path.join(ksm_dir, "report", "report.json"), encoding="utf-8") as fh:
        config = AnalysisConfig.from_dict(json.load(fh)["config"]["analysis"])  # the callback's own
    est = estimate_subsets(source, target, S[:, cols].astype(np.int64), config, run=run_record)
    return est.losses[:, list(est.target_names).index("all")]


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def within_size(S: np.ndarray, a, b) -> float:
    """Spearman within each subset size with at least 3 subsets, averaged weighted by their count."""
    sizes, a, b = S.sum(1), np.asarray(a), np.asarray(b)
    rows = [(int((sizes == k).sum()), _spearman(a[sizes == k], b[sizes == k]))
            for k in np.unique(sizes) if (sizes == k).sum() >= 3]
    return float(sum(n * r for n, r in rows) / sum(n for n, _ in rows))


def task_effects(S: np.ndarray, F) -> list:
    """Each task's effect on F (positive = harmful): its coefficient in the least-squares fit of F
    on the subset indicators over all subsets (exact when F is additive; "mean with minus mean
    without" is not, once the empty subset is left out)."""
    X = np.column_stack([np.ones(len(S)), np.asarray(S, dtype=float)])
    return [float(c) for c in np.linalg.lstsq(X, np.asarray(F, dtype=float), rcond=None)[0][1:]]


def score(S: np.ndarray, E: np.ndarray, real: np.ndarray, report_scores: dict, harmful: int) -> dict:
    """The brute-force comparison: ``E`` (m,) GradEx F^, ``real`` (seeds, m) real F."""
    F = real.mean(0)
    effects = task_effects(S, F)
    per_seed = [task_effects(S, f) for f in real]
    pairs = list(itertools.combinations(range(len(real)), 2))
    K = S.shape[1]
    return {
        "subsets": S.astype(int).tolist(), "real": real.tolist(), "gradex": E.tolist(),
        "real_task_effects": effects, "real_task_effects_per_seed": per_seed,
        "planted_most_harmful_in_retraining": int(np.argmax(effects)) == harmful,
        "planted_most_harmful_in_every_seed": all(int(np.argmax(e)) == harmful for e in per_seed),
        "spearman": {"gradex": _spearman(E, F), "minus_size": _spearman(-S.sum(1), F),
                     "noise_ceiling": float(np.mean([_spearman(real[a], real[b]) for a, b in pairs]))},
        "spearman_within_size": {"gradex": within_size(S, E, F),
                                 "noise_ceiling": float(np.mean([within_size(S, real[a], real[b])
                                                                 for a, b in pairs]))},
        "task_effect_spearman": {  # the ranking of the four tasks: report and GradEx against real
            "report_scores": _spearman([-report_scores[str(i)] for i in range(K)], effects),
            "gradex": _spearman(task_effects(S, E), effects),
            "noise_ceiling": float(np.mean([_spearman(per_seed[a], per_seed[b]) for a, b in pairs])),
        },
    }


def check_settings(out_dir: str, cfg, ignore=()) -> None:
    """Refuse to resume ``out_dir`` with other settings than the ones it was made with (its
    ``settings.json``, written on the first run): its harvest and retrainings would not be this
    configuration's. ``ignore``: fields allowed to differ."""
    path = os.path.join(out_dir, "settings.json")
    mine = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            theirs = {k: v for k, v in json.load(fh).items() if k not in ignore}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            what = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
            raise SystemExit(f"{out_dir} was made with other settings ({what}); use another --out")
    elif not ignore:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(asdict(cfg), fh, indent=2)


def module_name(recipe) -> str:
    """The recipe's importable name, also when it runs as ``python -m`` (``__main__``)."""
    return getattr(recipe.__spec__, "name", None) or recipe.__name__


def run(recipe, cfg, out_dir: str, *, retrain: bool = True, log=print) -> dict:
    """The four steps for one configuration of ``recipe`` (the recipe's module: ``task_data``,
    ``make_w0``, ``new_model``, ``logits``, ``N_TASKS``, ``HARMFUL``); resumable through the files
    in ``out_dir``."""
    from lightning_ksm import all_subsets, analyze
    from lightning_ksm.report import AttributionReport
    from lightning_ksm.retrain import retrain_subsets

    os.makedirs(out_dir, exist_ok=True)
    check_settings(out_dir, cfg)
    ksm_dir, w0_path = os.path.join(out_dir, "ksm"), os.path.join(out_dir, "w0.pt")
    report_dir = os.path.join(ksm_dir, "report")
    if os.path.exists(os.path.join(report_dir, "report.json")) and os.path.exists(w0_path):
        # resumed: the saved harvest analysed again by this version, with the first run's timings
        saved = AttributionReport.load(report_dir)
        report = analyze(ksm_dir, config=saved.config["analysis"])  # the callback's own settings
        report.timings = saved.timings
    else:
        start = time.perf_counter()
        w0 = recipe.make_w0(cfg)
        torch.save(w0, w0_path)
        pretrain = time.perf_counter() - start
        start = time.perf_counter()
        report = attribution_run(recipe, cfg, w0, out_dir)
        report.timings.update(pretrain=pretrain, attribution_fit=time.perf_counter() - start)
        report.save(report_dir)
    scores = dict(report.ranked("all"))
    ranked = list(scores)
    harmful = recipe.HARMFUL
    result = {"config": asdict(cfg), "projection": report.config["harvest"]["projector"]["kind"],
              "report_ranking": ranked, "report_scores": scores, "planted_task": str(harmful),
              "planted_ranked_last_by_report": ranked[-1] == str(harmful), "report_warnings": report.warnings(),
              "timings": {k: float(v) for k, v in report.timings.items()}}
    log(f"[{cfg.planted} seed {cfg.seed}] report ranking (most helpful first): {ranked}; projection "
        f"{result['projection']}; fit {result['timings']['attribution_fit']:.0f}s "
        f"(harvest {result['timings'].get('harvest', 0):.0f}s)")
    if not retrain:
        return result
    S = all_subsets(recipe.N_TASKS)
    E = gradex_on_subsets(ksm_dir, S)
    fn = RetrainSubset(module_name(recipe), cfg, w0_path, os.path.join(out_dir, "retrain_root"))
    real = np.array([retrain_subsets(fn, S.astype(np.int64), directory=os.path.join(out_dir, f"retrain_seed{s}"),
                                     seed=s).column("all") for s in range(cfg.n_seeds)])
    result.update(score(S, E, real, scores, harmful))
    log(f"[{cfg.planted} seed {cfg.seed}] real task effects {np.round(result['real_task_effects'], 3).tolist()}; "
        f"Spearman over subsets {json.dumps(result['spearman'])}; within size "
        f"{json.dumps(result['spearman_within_size'])}")
    return result


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def summarize(runs: list) -> dict:
    """Per planted kind: counts of the planted task ranked last, and Spearman over the seeds."""
    out = {}
    for kind in sorted({r["config"]["planted"] for r in runs}):
        rs = [r for r in runs if r["config"]["planted"] == kind]
        out[kind] = {"runs": len(rs),
                     "planted_ranked_last_by_report": sum(r["planted_ranked_last_by_report"] for r in rs),
                     "planted_most_harmful_in_retraining": sum(r["planted_most_harmful_in_retraining"] for r in rs),
                     "report_warned": sum(bool(r.get("report_warnings")) for r in rs)}
        for block in ("spearman", "spearman_within_size", "task_effect_spearman"):
            out[kind][block] = {k: _stats([r[block][k] for r in rs]) for k in rs[0][block]}
    return out


def tables(result: dict) -> str:
    """Markdown tables of a results file: one row per run, then the means over seeds."""
    lines = ["| planted | seed | report ranking | real effects (task 0-3) | GradEx | -\\|s\\| | ceiling "
             "| GradEx within size | ceiling | fit s | harvest s |", "|---" * 11 + "|"]
    for r in result["runs"]:
        sp, ws, t = r["spearman"], r["spearman_within_size"], r["timings"]
        lines.append(f"| {r['config']['planted']} | {r['config']['seed']} | {' '.join(r['report_ranking'])} | "
                     f"{' '.join(f'{e:+.2f}' for e in r['real_task_effects'])} | {sp['gradex']:.2f} | "
                     f"{sp['minus_size']:.2f} | {sp['noise_ceiling']:.2f} | {ws['gradex']:.2f} | "
                     f"{ws['noise_ceiling']:.2f} | {t['attribution_fit']:.0f} | {t['harvest']:.0f} |")
    for kind, m in (result.get("summary") or {}).items():
        sp, ws = m["spearman"], m["spearman_within_size"]
        lines.append(f"| **{kind}, mean** | {m['runs']} runs | planted last {m['planted_ranked_last_by_report']}/"
                     f"{m['runs']}, warned {m['report_warned']}/{m['runs']} | most harmful in retraining "
                     f"{m['planted_most_harmful_in_retraining']}/{m['runs']} | "
                     f"{sp['gradex']['mean']:.2f} | {sp['minus_size']['mean']:.2f} | {sp['noise_ceiling']['mean']:.2f} | "
                     f"{ws['gradex']['mean']:.2f} | {ws['noise_ceiling']['mean']:.2f} | | |")
    return "\n".join(lines)


def parse_overrides(cfg, items) -> dict:
    """``["lr=1e-5", "frozen_norm=true"]`` -> typed field values of the recipe's config."""
    fields = {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields or name in ("seed", "planted"):
            raise SystemExit(f"--set {item!r}: the settings are {sorted(set(fields) - {'seed', 'planted'})} "
                             "(seeds and planted labels have their own options)")
        kind = fields[name]
        try:
            out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError as exc:
            raise SystemExit(f"--set {item!r}: {name} takes a {kind.__name__} ({exc})") from None
    return out


def main(recipe, argv, *, versions: dict) -> dict:
    """The recipes' command line: ``--quick`` (attribution runs only), ``--seeds``, ``--planted``."""
    parser = argparse.ArgumentParser(description=recipe.__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the attribution runs only (no retraining)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="data / W0 / attribution-run seeds")
    parser.add_argument("--planted", nargs="+", default=["flipped"], choices=["flipped", "scrambled"])
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override recipe settings, e.g. --set lr=1e-5 projection=factorized")
    parser.add_argument("--out", default=None, help="working folder, kept and resumed (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--tables", default=None, metavar="JSON", help="print the tables of a results file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables, encoding="utf-8") as fh:
            result = json.load(fh)
        print(tables(result))
        return result
    base = replace(recipe.FULL, **parse_overrides(recipe.FULL, args.set))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.planted:
            for seed in args.seeds:
                cfg = replace(base, seed=seed, planted=kind)
                runs.append(run(recipe, cfg, os.path.join(args.out or tmp, f"{kind}_seed{seed}"), retrain=not args.quick))
    result = {"command": f"python -m {module_name(recipe)} " + " ".join(argv), "runs": runs,
              "summary": None if args.quick else summarize(runs),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, **versions}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    if not args.quick:
        print(tables(result))
    return result
