"""The package layout of docs/architecture.md, enforced: which folder may import which, where
Lightning may be imported, and the size limits that keep each file readable."""

import ast
import os
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ksm"

# Layers, bottom up (docs/architecture.md, "The import rule"). A module may import its own layer's
# base modules and anything in a lower layer; the pipeline stages never import each other (the
# analysis is where they meet); adapters may also import the callback base and the package root.
LAYERS = {
    "base": {"config", "fileio", "rundir", "task_ids", "_validation", "_progress", "_threads", "metrics", "subsets"},
    "data": {"features", "store"},
    "stages": {"harvesting", "estimation", "surrogates", "quality", "readouts"},
    "report": {"report"},
    "analysis": {"analysis", "assemble"},
    "adapters": {"callbacks", "_lightning", "pl", "cli", "retrain", "rl", "demo"},
}
ORDER = list(LAYERS)
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_utilities", "lightning_fabric")
MAY_IMPORT_LIGHTNING = {"callbacks", "_lightning", "pl", "rl", "demo"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        yield path, parts, is_init


def _imports(path: Path, parts: list, is_init: bool):
    """Absolute module names imported anywhere in the file (function-level imports included)."""
    package = parts if is_init else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            else:
                yield node.module or "", node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def _unit(parts: list) -> str | None:
    """The top-level unit (module or folder) of ``lightning_ksm``; None for the package root."""
    return parts[1] if len(parts) > 1 else None


def test_every_unit_has_a_layer():
    units = {_unit(parts) for _, parts, _ in _modules()} - {None}
    assert units <= set(LAYER_OF), f"add {sorted(units - set(LAYER_OF))} to LAYERS and docs/architecture.md"


def test_imports_follow_the_layers():
    broken = []
    for path, parts, is_init in _modules():
        unit = _unit(parts)
        if unit is None:
            continue  # the package root only re-exports, lazily
        layer = ORDER.index(LAYER_OF[unit])
        for name, line in _imports(path, parts, is_init):
            if not name.startswith("lightning_ksm"):
                continue
            target = _unit(name.split("."))
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if target is None:
                if LAYER_OF[unit] != "adapters":
                    broken.append(where + " (only adapters may import the package root)")
                continue
            if target == unit:
                continue
            target_layer = ORDER.index(LAYER_OF[target])
            if target_layer > layer:
                broken.append(where + f" (a {LAYER_OF[unit]} module may not import the {LAYER_OF[target]} layer)")
            elif target_layer == layer and LAYER_OF[unit] == "stages":
                broken.append(where + " (a pipeline stage may not import another stage)")
            elif target_layer == layer and LAYER_OF[unit] == "adapters" and target != "callbacks":
                broken.append(where + " (an adapter may import only the callback base among adapters)")
    assert not broken, "\n".join(broken)


def test_the_engine_never_imports_lightning():
    broken = []
    for path, parts, is_init in _modules():
        if _unit(parts) in MAY_IMPORT_LIGHTNING:
            continue
        for name, line in _imports(path, parts, is_init):
            if name.split(".")[0] in LIGHTNING:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("limit_name, limit", [("any module", 500)])
def test_no_module_is_longer_than_one_reader_can_hold(limit_name, limit):
    long = {str(p.relative_to(PACKAGE.parent)): n for p, _, _ in _modules()
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"split along a real seam: {long}"
    callback = PACKAGE / "callbacks" / "task_attribution.py"
    assert len(callback.read_text().splitlines()) < 350


def test_every_module_declares_its_public_names():
    missing = [str(p.relative_to(PACKAGE.parent)) for p, parts, _ in _modules()
               if parts[-1] != "__main__" and "__all__" not in p.read_text()]
    assert not missing, f"add __all__ to {missing}"


_LAYOUT_LITERAL = re.compile(r"""(join\([^)]*|/ )["'](w0\.pt|harvest|report|ksm)["']""")


def test_the_run_directory_layout_is_spelled_once():
    # w0.pt / harvest / report as path literals belong to rundir.py alone.
    offenders = []
    for path, parts, _ in _modules():
        if parts[-1] == "rundir":
            continue
        for match in _LAYOUT_LITERAL.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {match.group(0)}")
    assert not offenders, offenders


def test_the_architecture_doc_names_every_unit():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [u for u in LAYER_OF if f"`{u}" not in doc]
    assert not missing, f"docs/architecture.md does not describe {missing}"
    assert os.path.exists(PACKAGE.parent / "docs" / "architecture.md")


def test_the_engine_vocabularies_are_the_configs():
    from lightning_ksm import config, estimation, surrogates
    from lightning_ksm.harvesting import MODES, projection

    assert estimation.LOSSES is config.LOSSES and estimation.WEIGHTINGS is config.WEIGHTINGS
    assert MODES is config.OUTPUT_MODES
    assert set(projection.KINDS) | {"auto"} == set(config.PROJECTIONS)  # "auto" resolves to a kind
    assert set(config.KERNELS) <= set(surrogates._KERNELS)
