"""Leave-one-out vs influence functions vs a linear surrogate (the paper's Figure 1, appendix B.1).

Setup: scikit-learn's bundled Wisconsin breast-cancer data (569 samples, 30 features; no
download), a stratified split into 455 training points and 114 test points, features standardized
with the training split's mean and standard deviation, and l2-regularized logistic regression

    w(S) = argmin_w  (1/N) sum_{i in S} log-loss_i(w) + (lam / 2) |w_coef|^2,   lam = 1e-2, N = 455

(the intercept is not penalized; the objective keeps the factor 1/N when points are removed, so
"removing point i" deletes exactly one term). The target is the log-loss of one randomly chosen
test point. Three valuations of every training point i, all in the same unit (the predicted
change of the target loss when i is removed, > 0: i helps):

- **LOO**: refit from scratch (cold start) without i: ``F(S \\ {i}) - F(S)``;
- **influence function**: ``(1/N) g_test^T (H + 1e-3 I)^-1 g_i`` with H the Hessian of the full
  objective at w(S), g_i the gradient of point i's loss and g_test the target's gradient;
- **linear surrogate**: OLS of F(s) on the 0/1 indicators of 1000 random subsets of 430 points,
  each really refitted from scratch; the score of i is ``-coef_i``. Since every subset has exactly
  430 points, the coefficients are only identified up to a common constant; the minimum-norm
  solution (:class:`lightning_ksm.LinearSurrogate`) sums them to zero. Pearson correlations do not
  depend on that constant.

Fits use scikit-learn's exact Newton solver (``newton-cholesky``, tol 1e-12, cold start); every fit
is checked afterwards: the gradient norm of the objective must be below 1e-8.

Run ``python -m recipes.breast_cancer_loo`` (writes benchmarks/results/breast_cancer_loo.json and
its scatter PNG for seed 0, plus the correlations for seeds 1-4: other splits and target points)
or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

if __package__ in (None, ""):  # run as a script: make `lightning_ksm` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_ksm import LinearSurrogate  # noqa: E402

PAPER = {"pearson_linear_vs_loo": 0.98, "pearson_if_vs_loo": 0.97, "pearson_if_vs_linear": 0.96}
_GRAD_TOL = 1e-8


@dataclass
class LOOConfig:
    """Settings (recorded in the results JSON)."""

    n_train: int = 455
    lam: float = 1e-2
    damping: float = 1e-3
    n_subsets: int = 1000
    subset_size: int = 430
    seed: int = 0
    tol: float = 1e-12


QUICK = LOOConfig(n_subsets=600)


# ---------------------------------------------------------------------------------------------
# Data and the regularized logistic regression
# ---------------------------------------------------------------------------------------------


def load_data(cfg: LOOConfig):
    """Standardized train/test split of the bundled breast-cancer data, plus the target index."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=cfg.n_train, random_state=cfg.seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    target = int(np.random.default_rng(cfg.seed).integers(len(Xte)))
    return Xtr, ytr.astype(float), Xte, yte.astype(float), target


def _augment(X):
    return np.hstack([X, np.ones((len(X), 1))])  # the last coordinate is the intercept


def fit(X, y, cfg: LOOConfig, n_total: int) -> np.ndarray:
    """w = (coef, intercept) minimizing (1/n_total) sum log-loss + lam/2 |coef|^2 on (X, y).

    scikit-learn's ``LogisticRegression`` minimizes ``C sum log-loss + 1/2 |coef|^2``; the same
    minimizer with ``C = 1 / (lam n_total)``.
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / (cfg.lam * n_total), solver="newton-cholesky", tol=cfg.tol, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning is caught by the gradient check below
        model.fit(X, y)
    w = np.r_[model.coef_.ravel(), model.intercept_]
    gnorm = np.linalg.norm(objective_grad(w, X, y, cfg.lam, n_total))
    if gnorm > _GRAD_TOL:
        raise RuntimeError(f"logistic regression did not converge: gradient norm {gnorm:.3g} > {_GRAD_TOL}")
    return w


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def point_losses(w, X, y) -> np.ndarray:
    """Per-point log-loss ``log(1 + exp(-(2y - 1) x.w))``."""
    z = _augment(X) @ w
    return np.logaddexp(0.0, -(2 * y - 1) * z)


def point_grads(w, X, y) -> np.ndarray:
    """Per-point gradients of the log-loss, ``(n, d + 1)``."""
    Xa = _augment(X)
    return (_sigmoid(Xa @ w) - y)[:, None] * Xa


def objective_grad(w, X, y, lam, n_total) -> np.ndarray:
    """Gradient of (1/n_total) sum log-loss + lam/2 |coef|^2."""
    g = point_grads(w, X, y).sum(0) / n_total
    g[:-1] += lam * w[:-1]
    return g


def objective_hessian(w, X, y, lam, n_total) -> np.ndarray:
    """Hessian of the same objective."""
    Xa = _augment(X)
    p = _sigmoid(Xa @ w)
    H = (Xa * (p * (1 - p))[:, None]).T @ Xa / n_total
    H[np.arange(len(w) - 1), np.arange(len(w) - 1)] += lam
    return H


# ---------------------------------------------------------------------------------------------
# The three valuations
# ---------------------------------------------------------------------------------------------


def loo_scores(X, y, x_t, y_t, cfg: LOOConfig):
    """Exact leave-one-out: refit without each point (cold start). Returns (scores, w_full, F_full)."""
    N = len(X)
    w = fit(X, y, cfg, N)
    F_full = float(point_losses(w, x_t, y_t)[0])
    scores = np.empty(N)
    keep = np.ones(N, dtype=bool)
    for i in range(N):
        keep[i] = False
        scores[i] = point_losses(fit(X[keep], y[keep], cfg, N), x_t, y_t)[0] - F_full
        keep[i] = True
    return scores, w, F_full


def influence_scores(w, X, y, x_t, y_t, cfg: LOOConfig) -> np.ndarray:
    """First-order influence: removing point i moves w by ``(1/N) H^-1 g_i``, so the target loss
    changes by ``(1/N) g_test^T (H + damping I)^-1 g_i``."""
    N = len(X)
    H = objective_hessian(w, X, y, cfg.lam, N) + cfg.damping * np.eye(len(w))
    v = np.linalg.solve(H, point_grads(w, x_t, y_t)[0])
    return point_grads(w, X, y) @ v / N


def surrogate_scores(X, y, x_t, y_t, cfg: LOOConfig, F_full: float):
    """Refit on ``n_subsets`` random subsets of ``subset_size`` points; OLS of the target loss on
    the inclusion indicators. Returns (scores = -coef, subsets, F)."""
    N = len(X)
    rng = np.random.default_rng(cfg.seed + 1)
    S = np.zeros((cfg.n_subsets, N), dtype=bool)
    F = np.empty(cfg.n_subsets)
    for r in range(cfg.n_subsets):
        S[r, rng.choice(N, cfg.subset_size, replace=False)] = True
        F[r] = point_losses(fit(X[S[r]], y[S[r]], cfg, N), x_t, y_t)[0]
    model = LinearSurrogate().fit(S, F - F_full)
    return -model.coef_, S, F


def pearson(a, b) -> float:
    """Pearson correlation of two vectors."""
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------
# Plot and command line
# ---------------------------------------------------------------------------------------------


def scatter_png(path: str, loo, inf, lin, corr: dict) -> None:
    """Figure 1: LOO vs the linear surrogate, LOO vs the influence function, IF vs the surrogate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [
        (loo, lin, "leave-one-out (retrain)", "linear surrogate", corr["pearson_linear_vs_loo"]),
        (loo, inf, "leave-one-out (retrain)", "influence function", corr["pearson_if_vs_loo"]),
        (inf, lin, "influence function", "linear surrogate", corr["pearson_if_vs_linear"]),
    ]
    for ax, (a, b, xl, yl, r) in zip(axes, panels):
        ax.scatter(a, b, s=9, alpha=0.6)
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"Pearson r = {r:.3f}")
        ax.ticklabel_format(style="sci", axis="both", scilimits=(-2, 2))
    fig.suptitle("Effect of removing one training point on one test point's loss (breast cancer, l2 logistic)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: LOOConfig) -> dict:
    """All three valuations and their correlations; returns the results dict (with the arrays)."""
    Xtr, ytr, Xte, yte, target = load_data(cfg)
    x_t, y_t = Xte[target:target + 1], yte[target:target + 1]
    timings = {}
    start = time.perf_counter()
    loo, w, F_full = loo_scores(Xtr, ytr, x_t, y_t, cfg)
    timings["loo"] = time.perf_counter() - start
    start = time.perf_counter()
    inf = influence_scores(w, Xtr, ytr, x_t, y_t, cfg)
    timings["influence"] = time.perf_counter() - start
    start = time.perf_counter()
    lin, S, F = surrogate_scores(Xtr, ytr, x_t, y_t, cfg, F_full)
    timings["surrogate"] = time.perf_counter() - start
    corr = {
        "pearson_linear_vs_loo": pearson(lin, loo),
        "pearson_if_vs_loo": pearson(inf, loo),
        "pearson_if_vs_linear": pearson(inf, lin),
    }
    return {
        "config": asdict(cfg),
        "target_test_index": target,
        "target_label": int(y_t[0]),
        "target_loss_full": F_full,
        "train_accuracy": float(np.mean((_augment(Xtr) @ w > 0) == (ytr > 0.5))),
        "test_accuracy": float(np.mean((_augment(Xte) @ w > 0) == (yte > 0.5))),
        "correlations": corr,
        "paper": PAPER,
        "timings": timings,
        "scores": {"loo": loo.tolist(), "influence": inf.tolist(), "linear_surrogate": lin.tolist()},
        "subset_losses": F.tolist(),
        "w_full": w.tolist(),
    }


def main(argv=None) -> dict:
    """Command line entry point; returns the results dict it writes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer surrogate subsets (600 instead of 1000)")
    parser.add_argument("--seed", type=int, default=0, help="split, target point and subsets seed")
    parser.add_argument("--subsets", type=int, default=None, help="surrogate subsets (default 1000)")
    parser.add_argument("--results", default=None,
                        help="results JSON (default benchmarks/results/breast_cancer_loo.json; "
                             "--quick: runs/breast_cancer_loo_quick.json)")
    parser.add_argument("--png", default=None, help="scatter plot (default: next to the results JSON)")
    parser.add_argument("--other-seeds", type=int, default=None,
                        help="also report the correlations for seeds seed+1 .. seed+N (other splits, target "
                             "points and subsets; default 4, --quick: 0)")
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else LOOConfig(), seed=args.seed)
    if args.subsets is not None:
        cfg = replace(cfg, n_subsets=args.subsets)
    if cfg.n_subsets < 2:
        parser.error("--subsets must be at least 2")
    results_path = args.results or (
        os.path.join("runs", "breast_cancer_loo_quick.json") if args.quick
        else os.path.join("benchmarks", "results", "breast_cancer_loo.json")
    )
    png = args.png or os.path.splitext(results_path)[0] + ".png"
    start = time.perf_counter()
    res = run(cfg)
    res["name"] = "breast_cancer_loo"
    res["mode"] = "quick" if args.quick else "full"
    res["command"] = "python -m recipes.breast_cancer_loo " + " ".join(argv if argv is not None else sys.argv[1:])
    n_other = args.other_seeds if args.other_seeds is not None else (0 if args.quick else 4)
    others = []
    for extra in range(1, n_other + 1):
        r = run(replace(cfg, seed=cfg.seed + extra))
        others.append({k: r[k] for k in ("target_test_index", "target_label", "target_loss_full", "correlations")}
                      | {"seed": cfg.seed + extra})
    res["other_seeds"] = others
    if others:
        res["correlations_over_seeds"] = {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "min": float(np.min(v))}
            for key in PAPER
            for v in [[res["correlations"][key]] + [o["correlations"][key] for o in others]]
        }
    res["total_wall_seconds"] = time.perf_counter() - start
    res["environment"] = {"python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count()}
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    try:
        scatter_png(png, np.array(res["scores"]["loo"]), np.array(res["scores"]["influence"]),
                    np.array(res["scores"]["linear_surrogate"]), res["correlations"])
        res["png"] = png
    except ImportError:  # matplotlib is optional (dev extras)
        res["png"] = None
    with open(results_path, "w") as fh:
        json.dump(res, fh, indent=1)
    c = res["correlations"]
    print(f"Pearson: linear surrogate vs LOO {c['pearson_linear_vs_loo']:.3f} (paper 0.98), influence vs LOO "
          f"{c['pearson_if_vs_loo']:.3f} (paper 0.97), influence vs surrogate {c['pearson_if_vs_linear']:.3f} "
          f"(paper 0.96); wrote {results_path} ({res['total_wall_seconds']:.0f}s)")
    return res


if __name__ == "__main__":
    main()
