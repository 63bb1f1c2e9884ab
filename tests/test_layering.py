"""The import layering: the app (dschat) sits on the engine, the engine on the kernels; nothing imports upwards and no
module imports itself back through another. Read from the source with ast, so it covers function-local imports too."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folder each installed package lives in (pyproject.toml nests engine, kernels and themes under dschat).
FOLDERS = {"dschat": "dschat", "dschat.engine": "engine", "dschat.kernels": "kernels", "dschat.themes": "themes"}


def module_names() -> dict[str, Path]:
    names = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            names[".".join([package, *(p for p in parts if p != "__init__")])] = path
    return names


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports, anywhere in its source."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imported(name, path, set(names)) for name, path in names.items()}


def layer(name: str) -> str:
    for package in ("dschat.engine", "dschat.kernels", "dschat.themes"):
        if name == package or name.startswith(package + "."):
            return package
    return "dschat"


def test_the_graph_sees_the_known_imports():
    edges = graph()
    assert "dschat.kernels.mla_decode" in edges["dschat.engine.mla"]
    assert "dschat.engine" in edges["dschat.cli.pipe"]
    assert "dschat.conversation.session" in edges["dschat.tui.app"]  # modules in sub-packages too


def test_engine_kernels_and_themes_never_import_the_app():
    allowed = {"dschat.engine": {"dschat.engine", "dschat.kernels"}, "dschat.kernels": {"dschat.kernels"},
               "dschat.themes": {"dschat.themes"}, "dschat": {"dschat", "dschat.engine", "dschat.kernels",
                                                              "dschat.themes"}}
    wrong = [(a, b) for a, targets in graph().items() for b in targets if layer(b) not in allowed[layer(a)]]
    assert wrong == []


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt == "dschat" or (node.startswith(nxt + ".") and nxt in FOLDERS):
                continue  # a module importing its own package's __init__ is not a circle of ours
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_app_is_grouped_and_every_folder_says_what_it_holds():
    """The layout explains itself: few modules at the top of dschat/, each folder's __init__ says what it holds
    and has its line in the layout of docs/development.md."""
    app = ROOT / "dschat"
    top = [p.stem for p in app.glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(top) <= 6, f"modules at the top of dschat/: {sorted(top)}"
    layout = (ROOT / "docs" / "development.md").read_text()
    block = layout[layout.index("The app, `dschat/`"):layout.index("## Tests")]
    for folder in sorted(p.parent for p in app.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc, f"dschat/{folder.name}/__init__.py has no docstring"
        assert f"{folder.name}/" in block, f"dschat/{folder.name}/ not in the layout of docs/development.md"
    missing = [name for name in top if f"{name}.py" not in block]
    assert not missing, f"not in the layout of docs/development.md: {missing}"


def test_the_repository_root_is_not_on_sys_path():
    """There, kernels/ would shadow the `kernels` package that transformers imports (and dschat/ the installed
    one): the tests import what is installed."""
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path)
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").resolve().parent != ROOT / "kernels"
    import dschat.kernels

    assert Path(dschat.kernels.__file__).resolve().is_relative_to(ROOT / "kernels")


def test_a_shadowed_kernels_package_is_named_when_the_reference_cannot_be_built(tmp_path):
    """With the root on sys.path (as `python -m pytest` or a script's sys.path line once did), transformers
    imports this repository's kernels/ and building the reference fails far away: dschat.dev.reference's
    error then says why."""
    from dschat.dev import reference

    assert reference._shadowed() == ""
    code = "from dschat.dev import reference; print(reference._shadowed())"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dschat's own kernels folder" in r.stdout and str(ROOT / "kernels") in r.stdout, r.stdout


def test_the_app_and_the_engine_read_untrusted_files_with_one_reader_without_importing_torch(tmp_path):
    """dschat/files.py reads through engine/files.py (one implementation), and neither importing that nor the
    command's entry module imports torch: dschat.engine loads its public names when first used (PEP 562), so
    Ctrl+C is handled before torch starts loading. `from dschat.engine import Engine` still works."""
    code = ("import sys, dschat.files, dschat.engine.files, dschat.cli.main\n"
            "assert dschat.files.UnreadableFile is dschat.engine.files.UnreadableFile\n"
            "print('torch' in sys.modules)\n"
            "from dschat.engine import Engine, Tokenizer, SamplingParams, ModelError, resolve\n"
            "import dschat.engine as e\n"
            "print('torch' in sys.modules, e.Engine is Engine, 'Engine' in dir(e))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True", "True", "True"]
    import dschat.engine

    try:
        dschat.engine.NoSuchName
    except AttributeError as e:
        assert "NoSuchName" in str(e)
    else:
        raise AssertionError("dschat.engine.NoSuchName resolved")


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages a wheel gets: a folder left out works in an editable checkout and
    fails as installed (`No module named dschat.engine.layers`)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"dschat": "dschat", "engine": "dschat.engine", "kernels": "dschat.kernels", "themes": "dschat.themes",
               "training": "dschat.training"}
    found = {".".join([package, *init.parent.relative_to(ROOT / folder).parts])
             for folder, package in folders.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found - listed == set()
