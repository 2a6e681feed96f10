"""How the package is laid out: the largest module, class and function, and any import circle.

    python scripts/code_layout.py            # print the largest of each and every circle
    python scripts/code_layout.py --check    # also exit 1 past the limits or on a circle

Sizes are physical lines: a module's whole file, a class or function from its ``def``/``class``
line to its last line (docstring, comments and blank lines included). Imports are read with
``ast``, at module level and inside functions alike: a lazy import is still a dependency. Only
imports under ``if TYPE_CHECKING:`` are left out: they are never executed, they name types for
annotations.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "seq2seq"
LIMITS = {"module": 400, "class": 200, "function": 80}


def module_name(path: Path, root: Path) -> str:
    """``root/a/b.py`` -> ``<root name>.a.b``; a package's ``__init__.py`` is the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def sizes(root: Path) -> dict[str, list[tuple[int, str]]]:
    """Every module, class and function with its length in lines, longest first."""
    found: dict[str, list[tuple[int, str]]] = {kind: [] for kind in LIMITS}
    for name, path in modules(root).items():
        text = path.read_text(encoding="utf-8")
        found["module"].append((len(text.splitlines()), name))
        definitions(ast.parse(text), name, found)
    return {kind: sorted(items, reverse=True) for kind, items in found.items()}


def definitions(node: ast.AST, prefix: str, found: dict[str, list[tuple[int, str]]]) -> None:
    """Add every class and function under ``node`` by qualified name (``mod.Class.method``)."""
    for child in ast.iter_child_nodes(node):
        name = prefix
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "class" if isinstance(child, ast.ClassDef) else "function"
            name = f"{prefix}.{child.name}"
            found[kind].append((child.end_lineno - child.lineno + 1, name))
        definitions(child, name, found)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that module ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in executed_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a function-less name
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def executed_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                 "typing.TYPE_CHECKING"):
            for other in node.orelse:
                yield other
                yield from executed_nodes(other)
            continue
        yield node
        yield from executed_nodes(node)


def import_circles(root: Path) -> list[list[str]]:
    """Each set of modules that import one another in a circle, as one circle path."""
    paths = modules(root)
    graph = {name: sorted(imports(name, path, set(paths))) for name, path in paths.items()}
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(circle_path(sorted(component), graph))
    return circles


def circle_path(component: list[str], graph: dict[str, list[str]]) -> list[str]:
    """One circle through the first module of ``component``: a -> b -> ... -> a."""
    members, first = set(component), component[0]
    paths = {first: [first]}
    queue = [first]
    while queue:  # breadth first, so the circle shown is a shortest one
        node = queue.pop(0)
        for child in graph[node]:
            if child == first:
                return paths[node] + [first]
            if child in members and child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    raise AssertionError(f"no circle through {first}")  # a component always has one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a limit is passed or a circle exists")
    parser.add_argument("--root", type=Path, default=PACKAGE, help="package directory")
    args = parser.parse_args()
    if not args.root.is_dir() or not modules(args.root):
        problem = ("holds no .py file" if args.root.is_dir() else "not a directory"
                   if args.root.exists() else "no such directory")
        print(f"error: --root {args.root}: {problem}", file=sys.stderr)
        return 2
    failed = False
    for kind, items in sizes(args.root).items():
        over = [item for item in items if item[0] > LIMITS[kind]]
        lines, name = items[0]
        print(f"largest {kind}: {name} ({lines} lines; limit {LIMITS[kind]})")
        for lines, name in over:
            print(f"  over the limit: {name} ({lines} lines)")
        failed |= bool(over)
    circles = import_circles(args.root)
    print(f"import circles: {len(circles)}")
    for circle in circles:
        print("  " + " -> ".join(circle))
    failed |= bool(circles)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
