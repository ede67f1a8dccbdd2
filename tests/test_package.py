"""The package's shape: every module imports on its own, imports run one way (no cycle, function-level imports
included), every model goes through timm's registry, and the whole tree passes the linter."""
from __future__ import annotations

import ast
import graphlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cifar_tl"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cifar_tl."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cifar_tl.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def module_map() -> list[tuple[list[str], str]]:
    """docs/DEVELOPING.md's module map: (the package modules a row describes, its "imports" column)."""
    rows = []
    for line in (ROOT / "docs" / "DEVELOPING.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        modules = [m for m in re.findall(r"(\w+)\.py`", cells[0]) if m in MODULES] if len(cells) == 3 else []
        if modules:
            rows.append((modules, cells[2]))
    return rows


def test_developing_module_map_matches_the_imports():
    """The map a newcomer reads first names every module once, and each row's imports are the code's."""
    rows, graph = module_map(), import_graph()
    described = [m for modules, _ in rows for m in modules]
    assert sorted(described) == MODULES, "modules missing from (or twice in) docs/DEVELOPING.md's module map"
    wrong = {}
    for modules, column in rows:
        listed = set() if column in ("–", "") else {name.strip() for name in column.split(",")}
        actual = set().union(*(graph[m] for m in modules)) - set(modules)
        if listed != actual:
            wrong[", ".join(modules)] = {"not imported": sorted(listed - actual), "not listed": sorted(actual - listed)}
    assert not wrong, f"docs/DEVELOPING.md's import column is out of date: {wrong}"


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert set(MODULES) <= graph.keys()
    assert all(dep in graph for deps in graph.values() for dep in deps), graph
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    # the library layers never reach up to an entry point or a command-line module
    for low in ("files", "config", "data", "augment", "architectures", "models", "metrics", "card",
                "model_folder", "inference"):
        assert not graph[low] & {"engine", "cli", "demo", "hub", "predict", "evaluate", "export", "export_onnx"}
    assert order.index("loading") < order.index("demo")


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other cifar_tl module is loaded yet (a fresh
    interpreter per module would cost a torch import each; third-party modules stay cached)."""
    script = f"""
import importlib, sys, warnings
warnings.simplefilter("ignore")  # timm warns when the re-imported architectures register again
failed = []
for name in {MODULES!r}:
    for loaded in [m for m in sys.modules if m == "cifar_tl" or m.startswith("cifar_tl.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module("cifar_tl." + name)
    except Exception as err:
        failed.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_our_cnns_are_timm_models():
    import timm

    import cifar_tl.architectures  # noqa: F401  (registers them)
    from cifar_tl.architectures import VARIANTS

    for name in VARIANTS:
        model = timm.create_model(name, num_classes=7)
        assert model.pretrained_cfg["architecture"] == name and model.get_classifier().out_features == 7
        assert model.pretrained_cfg["input_size"] == (3, 32, 32)
        assert not timm.models.is_model_pretrained(name)  # no ImageNet weights: they train from scratch
    source = (PACKAGE / "models.py").read_text() + (PACKAGE / "model_folder.py").read_text()
    assert "BASELINE" not in source and "if name in" not in source  # no per-architecture branches


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install -e '.[dev]')")
def test_tree_passes_the_linter():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", "cifar_tl", "tests", "bench", "train.py", "app.py"], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
