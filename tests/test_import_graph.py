"""No import circles between the project's modules: every import counts, also one inside a function
(a lazy import hides a circle from Python, not from the reader)."""
import ast
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules(root: str = ROOT) -> dict:
    """Module name -> file, through pyproject's package-dir mapping (data/ is hetclip.data ...)."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    mods = {}
    for package, folder in package_dir.items():
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            rel = os.path.relpath(dirpath, os.path.join(root, folder))
            pkg = package if rel == "." else ".".join([package, *rel.split(os.sep)])
            if "__pycache__" in pkg or "__init__.py" not in files:
                continue
            for name in files:
                if name.endswith(".py"):
                    mods[pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"] = os.path.join(dirpath, name)
    return mods


def import_graph(mods: dict) -> dict:
    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods)
                if base in mods and base != package:
                    deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_circles_finds_a_circle_through_a_lazy_import(tmp_path):
    for pkg, files in {"hetclip": {"a.py": "from hetclip import b\n", "b.py": "def f():\n    from hetclip.a import x\n",
                                   "c.py": "from . import a\n"}}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackage-dir = { "hetclip" = "hetclip" }\n')
    graph = import_graph(project_modules(str(tmp_path)))
    assert graph["hetclip.c"] == {"hetclip.a"}
    assert circles(graph) == [["hetclip.a", "hetclip.b"]]


def test_no_import_circles_between_project_modules():
    mods = project_modules()
    assert {"hetclip.train", "hetclip.data.loader", "hetclip.zero_shot.evaluate", "hetclip.evals.zero_shot"} <= set(mods)
    found = circles(import_graph(mods))
    assert not found, "import circles (each line: modules that import each other, directly or around):\n" + \
        "\n".join("  " + " <-> ".join(c) for c in found)
