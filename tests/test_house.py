"""The shape of the house (issue 24): role subpackages, small modules and functions, no import
cycle, no private name imported across modules, keyword-only arguments past the second, tests
mirroring the package, and the light entry points loading no Ray, vLLM or torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.support import REPO

PACKAGE = REPO / "annotator"
ROLES = {"config", "method", "core", "engine", "score", "generate", "output", "run", "audit", "publish", "sft"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
HEAVY = ("ray", "vllm", "torch")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The annotator modules `tree` imports, at any depth (a function-level import counts too)."""
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("annotator"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                deps.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in known}
    return deps & known


def test_every_module_lives_in_a_role_folder():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == set()
    assert folders == ROLES


def test_modules_and_functions_stay_small():
    big = {}
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big[str(path.relative_to(REPO))] = lines
    long = {}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert big == {} and long == {}


def test_no_import_cycle():
    mods = modules()
    graph = {name: imported(tree, set(mods)) - {name} for name, tree in mods.items()}
    # Package __init__ modules that re-export (annotator.config) are edges to their parts only.
    seen: dict[str, int] = {}   # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("annotator"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert private == []


def test_arguments_past_the_second_are_keyword_only():
    loose = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("__"):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 2:
                    loose.append(f"{name}.{node.name}({', '.join(positional)})")
    assert loose == []


def test_tests_mirror_the_package():
    """Every module of `annotator/<role>/` is imported by a test in `tests/<role>/`."""
    mods = modules()
    unmirrored = []
    for name in mods:
        parts = name.split(".")
        if len(parts) != 3 or parts[2] == "__init__":
            continue
        folder = REPO / "tests" / parts[1]
        tests = [ast.parse(p.read_text()) for p in folder.glob("test_*.py")] if folder.is_dir() else []
        if not any(name in imported(t, set(mods)) for t in tests):
            unmirrored.append(name)
    assert unmirrored == []


LOAD_AND_LIST = """
import json, runpy, sys
target = sys.argv[1]
if target.endswith(".py"):
    sys.argv = [target, "--help"]
    try:
        runpy.run_path(target, run_name="__main__")
    except SystemExit:
        pass
else:
    __import__(target)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
""" % (list(HEAVY),)


@pytest.mark.parametrize("target", ["annotator.config", "annotator.output.report", "annotator.publish.hub",
                                    "annotator.publish.sft_hub", "pipelines/publish.py"])
def test_light_entry_points_load_no_ray_vllm_or_torch(target):
    out = subprocess.run([sys.executable, "-c", LOAD_AND_LIST, target], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
