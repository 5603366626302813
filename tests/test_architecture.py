"""The layers and their import rules (ARCHITECTURE.md), read from the source.

Every ``import`` of every module of the project is read with ``ast``, module-level and inside
functions alike (a function-level import is still a dependency), relative imports resolved. A
module belongs to the first layer whose prefix matches its name:

    tools       resnet_det.cli, resnet_det.studies, resnet_det.__main__, tools/*.py
    tasks       resnet_det.tasks.detection, resnet_det.tasks.segmentation
    engine      resnet_det.engine
    config      resnet_det.config
    data        resnet_det.data
    evaluation  resnet_det.evaluation
    segmentation (models)   segmentation
    detection (models)      detection
    backbone    backbone
    common      resnet_det_common

Arrows point down only; the forbidden edges are DESIGN.md's list. The tests below also check, in a
fresh interpreter, what ``import backbone / detection / segmentation`` actually load.

The folders show the layers: each top-level package holds one band of them, bottom to top
``resnet_det_common`` (common), ``backbone``, ``detection`` (models), ``segmentation`` (models), ``resnet_det``
(config, data, evaluation, engine, tasks, tools); an import between two packages runs only into a package
whose every layer sits below the importer. The old module paths (``detection.engine``, ``resnet_det.common``,
...) are aliases for one release (``SHIMS``), which only alias.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("resnet_det_common", "backbone", "detection", "segmentation", "resnet_det")
# Bottom to top: a package may import only packages before it.
PACKAGE_ORDER = PACKAGES
# old module (a file that only aliases, resnet_det_common.moved) -> the module it is an alias of, until 0.4.
SHIMS = {
    "resnet_det.common": "resnet_det_common",
    "detection.engine": "resnet_det.engine",
    "detection.data": "resnet_det.data",
    "detection.evaluation": "resnet_det.evaluation",
    "detection.config": "resnet_det.config",
    "detection.tasks": "resnet_det.tasks.detection",
    "segmentation.tasks": "resnet_det.tasks.segmentation",
}

# Longest prefix first: a module is in the first layer whose prefix matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tools", ("resnet_det.cli", "resnet_det.studies", "resnet_det.__main__", "tools")),
    ("tasks", ("resnet_det.tasks.detection", "resnet_det.tasks.segmentation")),
    ("engine", ("resnet_det.engine",)),
    ("config", ("resnet_det.config",)),
    ("data", ("resnet_det.data",)),
    ("evaluation", ("resnet_det.evaluation",)),
    ("common", ("resnet_det_common",)),
    ("segmentation", ("segmentation",)),
    ("detection", ("detection",)),
    ("backbone", ("backbone",)),
    ("package", ("resnet_det",)),
)

MODEL_LAYERS = {"backbone", "detection", "segmentation"}
# Height of each layer (DESIGN.md's picture, bottom 0); layers of one height do not import each other's folders.
LAYER_HEIGHT = {"common": 0, "backbone": 1, "detection": 2, "segmentation": 3, "package": 4, "config": 4, "data": 4,
                "evaluation": 4, "engine": 5, "tasks": 6, "tools": 7}
LIBRARY = {"common", "backbone", "detection", "segmentation", "data", "evaluation", "config", "engine", "tasks",
           "package"}

# (importer layer, imported layer) pairs that must never occur, with the reason.
FORBIDDEN: dict[tuple[str, str], str] = {}
for _layer in LIBRARY - {"common"}:
    FORBIDDEN[("common", _layer)] = "common imports nothing of the project"
for _layer in ("detection", "segmentation", "data", "evaluation", "config", "engine", "tasks", "tools"):
    FORBIDDEN[("backbone", _layer)] = "backbone -> detection/segmentation/tools"
for _layer in ("detection", "data", "evaluation", "config", "engine"):
    FORBIDDEN[(_layer, "segmentation")] = "detection (engine, data, evaluation, config included) -> segmentation"
for _model in MODEL_LAYERS:
    for _layer in ("engine", "data", "evaluation", "config", "tasks"):
        FORBIDDEN[(_model, _layer)] = "model modules -> engine/data/evaluation/config/tasks"
for _layer in ("data", "evaluation", "config"):
    FORBIDDEN[(_layer, "engine")] = "data/evaluation/config sit below the engine"
    FORBIDDEN[(_layer, "tasks")] = "only tools and tests import the tasks"
FORBIDDEN[("engine", "tasks")] = "only tools and tests import the tasks"
for _layer in LIBRARY:
    FORBIDDEN[(_layer, "tools")] = "library -> tools"


def layer_of(module: str) -> str | None:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    files += sorted((REPO / "tools").glob("*.py"))
    return files


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, name: str, *, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import of module `name`'s source, at any depth."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from pkg import submodule` imports the submodule too.
            found.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
    return found


def edges() -> list[tuple[str, str, str, str, int]]:
    """(importer module, imported module, importer layer, imported layer, line) within the project."""
    out = []
    known = {module_name(p) for p in project_files()}
    for path in project_files():
        src = module_name(path)
        src_layer = layer_of(src)
        for target, line in imports_of(path):
            # Keep only project modules (a `from x import name` adds `x.name`, which may be a class).
            if target not in known and not any(k.startswith(target + ".") for k in known):
                continue
            dst_layer = layer_of(target)
            if src_layer and dst_layer and src != target:
                out.append((src, target, src_layer, dst_layer, line))
    return out


def test_each_package_holds_one_band_of_layers_and_imports_run_into_lower_packages_only() -> None:
    """No import runs from a lower layer into a folder that also holds a higher one: the packages are ordered
    (PACKAGE_ORDER), each holds layers no higher than the lowest layer of any package above it, and an import
    between packages goes down that order."""
    held: dict[str, set[str]] = {}
    for path in project_files():
        name = module_name(path)
        if name in SHIMS:
            continue
        held.setdefault(name.split(".")[0], set()).add(layer_of(name) or "?")
    rank = {pkg: i for i, pkg in enumerate(PACKAGE_ORDER)}
    for lower, upper in itertools.pairwise(PACKAGE_ORDER):
        top = max(LAYER_HEIGHT[layer] for layer in held[lower])
        bottom = min(LAYER_HEIGHT[layer] for layer in held[upper])
        assert top <= bottom, f"{lower} holds layers {sorted(held[lower])} above {upper}'s {sorted(held[upper])}"
    bad = []
    for src, dst, a, _, line in edges():
        p, q = src.split(".")[0], dst.split(".")[0]
        crosses = p in rank and q in rank and p != q and src not in SHIMS
        if crosses and (rank[q] > rank[p] or max(LAYER_HEIGHT[layer] for layer in held[q]) > LAYER_HEIGHT[a]):
            bad.append(f"{src}:{line} ({a}) imports {dst}, in {q}, which holds {sorted(held[q])}")
    assert not bad, "imports into a package that holds a higher layer:\n" + "\n".join(bad)


@pytest.mark.parametrize(("old", "new"), sorted(SHIMS.items()))
def test_old_module_paths_are_aliases_of_the_new_modules_with_a_deprecation_warning(old: str, new: str) -> None:
    """Same module objects (classes keep their identity), submodules included, and a DeprecationWarning naming
    the new import; the shim file holds nothing but the alias."""
    path = REPO / (old.replace(".", "/") + ".py")
    path = path if path.exists() else REPO / old.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [ast.unparse(c) for c in calls] == [f"alias_module(__name__, {new!r})"], f"{path} does more than alias"
    sub = {"resnet_det.engine": "trainer", "resnet_det.data": "formats.yolo", "resnet_det.evaluation": "coco",
           "resnet_det_common": "io"}.get(new)
    pairs = [(old, new)] + ([(f"{old}.{sub}", f"{new}.{sub}")] if sub else [])
    code = (
        "import importlib, json, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    same = [importlib.import_module(a) is importlib.import_module(b) for a, b in {pairs!r}]\n"
        "print(json.dumps({'same': same, 'warnings': [str(x.message) for x in w if x.category is DeprecationWarning]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(report["same"]) and report["same"], report
    assert any(f"{old} moved to {new}" in m and f"import {new}" in m for m in report["warnings"]), report


def test_every_project_module_has_a_layer() -> None:
    missing = [module_name(p) for p in project_files() if layer_of(module_name(p)) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS and ARCHITECTURE.md): {missing}"


def test_no_forbidden_import() -> None:
    bad = [f"{src}:{line} imports {dst} ({FORBIDDEN[(a, b)]})" for src, dst, a, b, line in edges()
           if (a, b) in FORBIDDEN]
    # By package too: nothing in detection (its task module included) imports segmentation.
    bad += [f"{src}:{line} imports {dst} (detection -> segmentation)" for src, dst, _, _, line in edges()
            if src.split(".")[0] == "detection" and dst.split(".")[0] == "segmentation"]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_the_reader_sees_function_level_and_relative_imports() -> None:
    """So the rules above can fail: a hidden import inside a function of an engine module is seen."""
    source = "def f():\n    from ...segmentation import models\n    import resnet_det.tasks.detection\n"
    found = [t for t, _ in imports_in(source, "resnet_det.engine.probe")]
    assert {"segmentation", "segmentation.models", "resnet_det.tasks.detection"} <= set(found)
    assert layer_of("resnet_det.engine.probe") == "engine"
    assert ("engine", "segmentation") in FORBIDDEN and ("engine", "tasks") in FORBIDDEN


def test_no_import_cycle_between_packages() -> None:
    """Layers form a DAG: no layer reaches itself through other layers."""
    graph: dict[str, set[str]] = {}
    for _, _, a, b, _ in edges():
        if a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle between layers: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _loaded_by(statement: str) -> list[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", ["backbone", "detection", "segmentation"])
def test_importing_a_model_package_loads_no_engine_data_evaluation_or_config(package: str) -> None:
    loaded = _loaded_by(f"import {package}")
    heavy = [m for m in loaded if layer_of(m) in {"engine", "data", "evaluation", "config", "tasks", "tools"}]
    assert not heavy, f"import {package} loads {heavy}"


def test_one_atomic_writer_one_autocast_helper_no_sys_path_edits() -> None:
    """`os.replace` lives in one helper, autocast is set up in one helper (models may switch it off
    locally for an fp32 loss), and nothing edits sys.path."""
    replace, autocast, sys_path = [], [], []
    for path in [*project_files(), *sorted((REPO / "tests").rglob("*.py"))]:
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            text = ast.unparse(node.func)
            if text == "os.replace":
                replace.append(rel)
            if text == "torch.autocast" and not any(
                kw.arg == "enabled" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                for kw in node.keywords
            ):
                autocast.append(rel)
            if text in ("sys.path.insert", "sys.path.append", "sys.path.extend"):
                sys_path.append(rel)
    library_autocast = [p for p in autocast if not p.startswith("tests/")]
    assert sorted(set(replace)) == ["resnet_det_common/io.py"], replace
    assert sorted(set(library_autocast)) == ["resnet_det_common/amp.py"], library_autocast
    assert not sys_path, f"sys.path edits: {sys_path}"
