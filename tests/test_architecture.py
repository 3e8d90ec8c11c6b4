"""The package's walls: each folder is a layer, imports point down only, no cycles, and a module's header shows
what it stands on (internal imports at module level; only the CLI loads a command's modules when it runs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sparsecse"
LAYERS = ("core", "method", "study", "ops", "run")  # bottom to top; `sparsecse` (errors) below, `cli` above


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(root: Path) -> list[tuple[str, str, bool]]:
    """(importer, imported module, at module level) for every import of the package by itself."""
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    out = []
    for name, p in mods.items():
        tree = ast.parse(p.read_text())
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = (pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else [])
                mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != name:
                    out.append((name, t, id(node) in top))
    return out


def layer(module: str) -> int:
    """0 for the root package, 1… for the layers in LAYERS' order, above them the CLI."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in LAYERS:
        return 1 + LAYERS.index(parts[1])
    return 1 + len(LAYERS)  # sparsecse.cli, sparsecse.__main__


def back_imports(root: Path) -> list[str]:
    return [f"{a} -> {b}" for a, b, _ in internal_imports(root) if layer(b) > layer(a)]


def cycles(root: Path) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for a, b, _ in internal_imports(root):
        graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(v, stack):
        state[v] = 1
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                found.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    return found


def test_imports_point_down_the_layers_only():
    assert back_imports(PKG) == []


def test_the_package_has_no_import_cycle():
    assert cycles(PKG) == []


def test_internal_imports_sit_in_the_module_header_except_the_clis_commands():
    lazy = sorted({f"{a} -> {b}" for a, b, top in internal_imports(PKG) if not top and a != "sparsecse.cli"})
    assert lazy == []


def test_every_layer_is_a_folder_whose_docstring_names_what_it_may_import():
    for i, name in enumerate(LAYERS):
        doc = ast.get_docstring(ast.parse((PKG / name / "__init__.py").read_text())) or ""
        allowed = re.search(r"May import: (.*)", doc, re.S)
        assert allowed, name
        named = set(re.findall(r"`(\w+)`", allowed.group(1)))
        assert set(LAYERS[:i]) <= named and not named & set(LAYERS[i + 1:]), (name, named)
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py"]  # everything else lives in a layer


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "sparsecse"
    for rel, text in {"__init__.py": "", **{f"{d}/__init__.py": "" for d in LAYERS}, **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("line", ["from ..study.select import select", "from ..run import sweep",
                                  "import sparsecse.ops.export"])
def test_the_checks_catch_a_back_import_a_cycle_and_a_lazy_import(tmp_path, line):
    """The checks above are not vacuous: a core module importing upward, two modules importing each other and an
    import hidden in a function are each reported."""
    root = _package(tmp_path, {"core/config.py": line + "\n", "study/select.py": "", "run/sweep.py": "",
                               "ops/export.py": ""})
    assert back_imports(root) and not cycles(root)
    root = _package(tmp_path / "c", {"method/a.py": "from . import b\n", "method/b.py": "from .a import x\n"})
    assert cycles(root) and not back_imports(root)
    root = _package(tmp_path / "l", {"method/a.py": "def f():\n    from ..core import io\n", "core/io.py": ""})
    assert [top for *_, top in internal_imports(root)] == [False]


METRIC_LITERAL = re.compile(r"""["'](?:test/|transfer/|best_stsb_dev["']|stsb_dev["'])""")


def metric_literals(root: Path) -> list[str]:
    """Places outside core/results.py that spell a trial metric's key instead of naming it (DEV, LAST_DEV,
    metric_key(kind, task))."""
    return [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py")) if p.relative_to(root).as_posix()
            != "core/results.py" for i, line in enumerate(p.read_text().splitlines(), 1)
            if METRIC_LITERAL.search(line.split("#")[0])]


def test_metric_keys_are_spelled_in_one_place():
    assert metric_literals(PKG) == []


def test_the_metric_key_check_catches_a_stray_literal(tmp_path):
    root = _package(tmp_path, {"study/report.py": 'best = row["test/avg"]\n',
                               "core/results.py": 'DEV = "best_stsb_dev"\n'})
    assert metric_literals(root) == ["study/report.py:1"]
