"""The package's layers import downwards only: parallel <- models <- training <- entry points."""

import ast
import subprocess
import sys
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


def test_the_entry_points_import_neither_dynamo_nor_datasets():
    """Each costs every process that imports it (the launching one and each worker of every job) ~0.5-1 s to start
    and more to exit: dynamo is imported by compiling (or by torch.optim, in a training worker), datasets by
    building a data cache or reading from the hub."""
    entry_points = ["train", "generate", "convert", "analyze", "tasks.lambada", "tasks.race", "tasks.wikitext103"]
    imports = "; ".join(f"import megatron_exp.{name}" for name in entry_points)
    code = f"import sys; {imports}; print(sorted({{'torch._dynamo', 'datasets', 'pandas'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
