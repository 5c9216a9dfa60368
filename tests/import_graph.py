"""The package's import structure, read from the source (no import is executed).

``python tests/import_graph.py [ROOT]`` prints the modules, the import edges between them,
the rooms (``mcattn`` itself and each subpackage), the floors (rooms layered by their imports:
a room sits one floor above the highest room it imports), the import circles between modules
and the longest method ``__init__.py``. tests/test_style.py asserts on the circles.

Every ``import`` statement counts, also those inside functions: a lazy import postpones a
circle to call time, it does not remove it. An edge from a module to a package that contains
it (``from . import naive`` names the package first) is not a dependency and is left out.
"""

import ast
import collections
import sys
from pathlib import Path

METHODS = ("exact", "mca", "rfa", "eatt", "latte", "eigen")


def modules(root):
    """``{dotted name: path}`` of every module under ``root/mcattn``."""
    root = Path(root)
    found = {}
    for path in sorted((root / "mcattn").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _targets(name, path, node, known):
    """Modules of ``known`` that one import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    names = [module] + [f"{module}.{a.name}" for a in node.names]
    return [t for t in names if t in known]


def edges(found):
    """``{module: set of modules it imports}`` (packages that contain the importer left out)."""
    graph = collections.defaultdict(set)
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, path, node, found):
                    if target != name and not name.startswith(target + "."):
                        graph[name].add(target)
    return graph


def circles(graph, nodes):
    """Strongly connected groups of more than one node (Tarjan, iterative)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, successors = work[-1]
            for w in successors:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return sorted(groups)


def room(name):
    """The room of a module: its package for a module of ``mcattn``'s subpackages."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def floors(found, graph):
    """``{room: floor}``: rooms in one circle share a floor; 0 imports no other room."""
    rooms = {room(m) for m in found} - {"mcattn"}
    room_graph = collections.defaultdict(set)
    for a, targets in graph.items():
        for b in targets:
            if room(a) != room(b) and room(a) in rooms and room(b) in rooms:
                room_graph[room(a)].add(room(b))
    merged = {r: r for r in rooms}
    for group in circles(room_graph, sorted(rooms)):
        for r in group:
            merged[r] = group[0]
    deps = collections.defaultdict(set)
    for a, targets in room_graph.items():
        deps[merged[a]] |= {merged[b] for b in targets if merged[b] != merged[a]}
    level = {}

    def floor_of(r):
        if r not in level:
            level[r] = 1 + max((floor_of(b) for b in deps[r]), default=-1)
        return level[r]

    return {r: floor_of(merged[r]) for r in sorted(rooms)}


def summary(root):
    """The figures the module docstring lists, as a dict."""
    found = modules(root)
    graph = edges(found)
    inits = {m: len(Path(found[f"mcattn.{m}"]).read_text().splitlines())
             for m in METHODS if f"mcattn.{m}" in found}
    return {"modules": len(found), "edges": sum(len(t) for t in graph.values()),
            "floors": floors(found, graph), "circles": circles(graph, sorted(found)),
            "init_lines": inits}


def main(argv):
    root = argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1]
    s = summary(root)
    print(f"modules {s['modules']}  import edges {s['edges']}  rooms {len(s['floors'])}  "
          f"floors {max(s['floors'].values()) + 1}")
    by_floor = collections.defaultdict(list)
    for r, f in s["floors"].items():
        by_floor[f].append(r.removeprefix("mcattn."))
    for f in sorted(by_floor):
        print(f"  floor {f}: {' '.join(sorted(by_floor[f]))}")
    print(f"circles {len(s['circles'])}")
    for group in s["circles"]:
        print("  " + " <-> ".join(group))
    print("method __init__.py lines: "
          + " ".join(f"{m} {n}" for m, n in s["init_lines"].items()))


if __name__ == "__main__":
    main(sys.argv)
