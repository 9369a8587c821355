"""The package's layers import downwards only: parallel <- models <- training <- entry points."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_exp"

# What each layer may import from the package (itself included). Entry points (the top-level modules that are
# not listed, and tasks/) may import anything.
ALLOWED = {
    "parallel": {"parallel"},
    "data": {"config", "console", "data"},
    "models": {"config", "parallel", "models"},
    "training": {"config", "hardware", "parallel", "data", "models", "training"},
    "config": set(),
    "console": set(),
    "hardware": {"config"},
}


def _layer(module: str) -> str:
    return module.removeprefix("megatron_exp.").split(".")[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "megatron_exp"}
    return {name for name in found if name.startswith("megatron_exp.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(".".join(p.relative_to(PACKAGE).parts)) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_layer_imports_only_the_layers_below_it(path):
    layer = _layer(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    wrong = {name for name in _imports(path) if _layer(name) not in ALLOWED[layer] | {layer}}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_rule_covers_every_layer_below_the_entry_points():
    assert {"parallel", "models", "training", "data"} <= {
        _layer(".".join(p.relative_to(PACKAGE).parts)) for p in MODULES
    }
