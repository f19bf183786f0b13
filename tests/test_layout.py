"""The module layout the README's reading order describes: no import cycles between the project's
modules, core.py imports none of them, and no module imports one of them inside a function."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(node) -> set[str]:
    """Project modules imported by the import statements directly in `node`'s body tree."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.add(n.module.split(".")[0])
    return out & set(MODULES)


def graph() -> dict[str, set[str]]:
    """module -> project modules it imports at the top level (the `__main__` block left out)."""
    edges = {}
    for name in MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        top = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        edges[name] = set().union(*(project_imports(n) for n in top if isinstance(n, (ast.Import, ast.ImportFrom))))
    return edges


def test_no_import_cycles_and_core_imports_nothing_of_the_project():
    edges = graph()
    assert edges["core"] == set()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_project_module_is_imported_inside_a_function():
    for name in MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = project_imports(ast.Module(body=fn.body, type_ignores=[]))
                assert not inner, f"{name}.{fn.name} imports {sorted(inner)} inside the function"


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle check is not vacuous: two modules that import each other fail it."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("import a\n")
    (tmp_path / "core.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", ["a", "b", "core"])
    try:
        test_no_import_cycles_and_core_imports_nothing_of_the_project()
    except AssertionError as e:
        assert "import cycle: a -> b -> a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")
