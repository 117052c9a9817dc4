"""Imports point down: scripts -> eval/ -> modules/, never back, and no circle among a folder's files, deferred
imports (inside functions) included."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in REPO.glob("train_*.py")}


def imported_names(path):
    """Every module a file imports, as a dotted name from the repo root (relative imports resolved)."""
    package = path.parent.relative_to(REPO).parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            names.add(".".join(module))
            names.update(".".join(module + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
    return names


def local_graph(folder, bare_names=False):
    """{file stem: stems of the same folder it imports} for a folder's files; ``bare_names``: the folder is on
    sys.path when its files run, so ``import x`` / ``from x import y`` name its file x.py too."""
    stems = {path.stem for path in (REPO / folder).glob("*.py")}
    graph = {}
    for path in (REPO / folder).glob("*.py"):
        names = imported_names(path)
        targets = {name.split(".")[1] for name in names if name.startswith(f"{folder}.")}
        if bare_names:
            targets |= {name.split(".")[0] for name in names}
        graph[path.stem] = (targets & stems) - {path.stem}
    return graph


def circles(graph):
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_modules_or_eval_files():
    assert circles(local_graph("modules")) == [], "import circles among modules/ files"
    assert circles(local_graph("eval", bare_names=True)) == [], "import circles among eval/ files"


def test_eval_files_are_seen_importing_each_other():
    assert "cmteb_errors" in local_graph("eval", bare_names=True)["cmteb_tasks"]


def test_modules_import_no_script_eval_tool_or_bench():
    upward = {}
    for path in sorted((REPO / "modules").glob("*.py")):
        reached = {name for name in imported_names(path)
                   if name.split(".")[0] in SCRIPTS | {"eval", "tools", "bench", "tests"}}
        if reached:
            upward[path.name] = sorted(reached)
    assert upward == {}


def test_eval_imports_no_script_tool_or_bench():
    upward = {}
    for path in sorted((REPO / "eval").glob("*.py")):
        reached = {name for name in imported_names(path) if name.split(".")[0] in SCRIPTS | {"tools", "bench", "tests"}}
        if reached:
            upward[path.name] = sorted(reached)
    assert upward == {}
