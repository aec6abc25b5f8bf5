"""The package's layers (docs/design.md §12): no module imports from a layer above its own, and no private name
(``_x``) is imported across a package boundary."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pmmrec"
# Bottom to top; a module may import from its own layer or any layer below it.
LAYERS = [
    {"errors", "utils", "config", "pretrained", "__init__"},
    {"runtime"},
    {"data"},
    {"objectives"},
    {"models"},
    {"evaluation"},
    {"training"},
    {"inference"},
    {"serving"},
    {"report", "demo", "bench", "cli", "__main__"},
]


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pmmrec"):
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pmmrec."):
                    yield node.lineno, alias.name, []


def _top(module_path: Path) -> str:
    parts = module_path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def test_every_package_has_a_layer():
    tops = {_top(p) for p in SRC.rglob("*.py")}
    assert tops <= set().union(*LAYERS), sorted(tops - set().union(*LAYERS))


def _edges():
    """(where, own package, imported package, module, names) of every pmmrec import in src/."""
    for path in SRC.rglob("*.py"):
        for line, module, names in _imports(path):
            target = module.split(".")[1] if "." in module else "__init__"
            yield f"{path.relative_to(SRC)}:{line}", _top(path), target, module, names


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{where} imports {module}" for where, own, target, module, _ in _edges()
              if _layer(target) > _layer(own)]
    assert not upward, "\n".join(upward)


def test_no_private_name_crosses_a_package_boundary():
    crossing = []
    for where, own, target, module, names in _edges():
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != own:
            crossing.append(f"{where} imports {private} from {module}")
    assert not crossing, "\n".join(crossing)
