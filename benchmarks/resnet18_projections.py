"""The ResNet-18 planted-task check with another projection, on the same real retrainings.

Runs ``recipes/resnet18_planted.py``'s attribution again with ``--projection`` (default
``factorized``) for the 6 configurations of a finished recipe run (``--base``: 3 seeds x flipped and
scrambled labels), copying that run's real retrainings (they do not depend on the projection; the
script checks that W0 is the same, bit for bit). Commands (one thread each; about 1 minute per
configuration plus the W0 pretraining):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resnet18_projections.py \\
        --base runs/planted/resnet18 --out runs/planted/resnet18_factorized \\
        --json benchmarks/results/resnet18_planted_factorized.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resnet18_projections.py --set lr=1e-5 \\
        --base runs/planted/resnet18_lr1e-5 --out runs/planted/resnet18_lr1e-5_factorized \\
        --json benchmarks/results/resnet18_planted_lr1e-5_factorized.json

The base runs: ``python -m recipes.resnet18_planted --seeds 0 1 2 --planted flipped scrambled
[--set lr=1e-5] --out <base> --json ...`` (``docs/results.md`` section 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from recipes import _planted  # noqa: E402
from recipes import resnet18_planted as rn  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the finished recipe run whose retrainings are reused")
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--projection", default="factorized")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="as the recipe's --set")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    overrides = _planted.parse_overrides(rn.FULL, args.set)
    if "projection" in overrides:
        raise SystemExit("give the projection with --projection, not --set projection=")
    base_cfg = dataclasses.replace(rn.FULL, projection=args.projection, **overrides)
    runs = []
    for kind in ("flipped", "scrambled"):
        for seed in (0, 1, 2):
            name = f"{kind}_seed{seed}"
            out, base = os.path.join(args.out, name), os.path.join(args.base, name)
            os.makedirs(out, exist_ok=True)
            # the base run's retrainings apply only to the same settings but the projection
            _planted.check_settings(base, dataclasses.replace(base_cfg, planted=kind, seed=seed), ignore=("projection",))
            for s in range(base_cfg.n_seeds):
                if not os.path.exists(os.path.join(out, f"retrain_seed{s}")):
                    shutil.copytree(os.path.join(base, f"retrain_seed{s}"), os.path.join(out, f"retrain_seed{s}"))
            runs.append(rn.run(dataclasses.replace(base_cfg, planted=kind, seed=seed), out))
            a, b = (torch.load(os.path.join(d, "w0.pt"), weights_only=True) for d in (out, base))
            if not all(torch.equal(a[k], b[k]) for k in a):
                raise SystemExit(f"{name}: W0 differs from the base run's; its retrainings do not apply")
    result = {"command": "python benchmarks/resnet18_projections.py " + " ".join(argv), "runs": runs,
              "summary": _planted.summarize(runs)}
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(_planted.tables(result))
    return result


if __name__ == "__main__":
    main()
