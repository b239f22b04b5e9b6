"""The package's imports flow one way, from the command line down to the foundations: a module
imports nothing of a layer above its own, wherever the import statement sits (function-level
imports included), and the training package imports nothing of the analysis one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sideways_cli"
# The layer of each folder of the package (and of the modules at its root): lower is more
# basic. A module added to a folder takes the folder's layer; a new folder or root module must be
# given one here.
LAYERS = {
    "support": 0,  # errors, atomic files, paths, devices and seeds, stop signals, help format
    "config": 1, "reports": 1,  # the config; tables, plots, progress bars
    "data": 2, "models": 2,  # the library: videos and networks ...
    "engine": 3,  # ... the training rules (Sideways and BP) ...
    "parallel": 4,  # ... and their depth- and data-parallel execution over torch.distributed
    "run": 5,  # one training run: build, loaders, learner, loop, run directory, resume, evaluation
    "analyses": 6,  # compare, check, fidelity, stream
    "api": 6,  # a trained run used from Python (predict)
    "cli": 7, "__main__": 7,
}
ROOT_MODULES = {"__init__", "__main__", "api", "cli", "config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    top = name.split(".")[0]
    if top not in LAYERS:
        raise AssertionError(f"sideways_cli.{name} has no layer in LAYERS: add it")
    return LAYERS[top]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = module_name(path).split(".")[: -node.level if path.name != "__init__.py" else None]
                if path.name == "__init__.py" and node.level > 1:
                    base = base[: 1 - node.level]
                target = ".".join(["sideways_cli", *base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if target == "sideways_cli"]  # "from sideways_cli import cli"
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p) or "sideways_cli")
def test_no_module_imports_a_layer_above_its_own(path):
    name = module_name(path)
    if not name:  # the package's __init__ runs before any module: it imports none of them
        assert not [target for _, target in imports(path) if target.startswith("sideways_cli")], \
            "sideways_cli/__init__.py imports the package's modules: every import of any would run them"
        return
    for line, target in imports(path):
        assert not target.startswith("sideways_perf"), \
            f"{path.name}:{line} imports {target}: the analysis package stays out of training"
        if target.startswith("sideways_cli.") and target != "sideways_cli":
            imported = target[len("sideways_cli."):]
            assert layer(imported) <= layer(name), \
                f"sideways_cli.{name} (layer {layer(name)}) imports {target} (layer {layer(imported)})"


def test_every_module_has_a_layer():
    for path in FILES:
        if module_name(path):
            layer(module_name(path))


def test_the_root_holds_only_the_command_line_the_config_and_the_api():
    """Everything else lives in a folder that says what it is."""
    assert {p.stem for p in PACKAGE.glob("*.py")} == ROOT_MODULES


def test_config_needs_neither_the_engine_nor_the_models():
    targets = {target for _, target in imports(PACKAGE / "config.py")}
    assert not any(t.startswith(("sideways_cli.engine", "sideways_cli.models")) for t in targets)
