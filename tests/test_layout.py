"""The package's shape: imports that flow one way."""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pdclip_imports() -> dict[str, set[str]]:
    """`{module: the pdclip modules it imports}` for every module under pdclip/, from its source (imports
    inside functions too: a lazy import still closes a circle)."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in ROOT.glob("pdclip/**/*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:  # `from .x import y` inside package a.b: a.b.x
                    anchor = package.split(".")[:len(package.split(".")) + 1 - node.level]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
        graph[name] = set()
        for target in targets:  # `import pdclip.x.y` or `from pdclip.x import y`: the module it names
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def test_no_import_cycle_in_pdclip():
    graph = _pdclip_imports()
    assert {"pdclip.study.presets", "pdclip.study.report", "pdclip.study.__main__"} <= set(graph)
    # The parser sees top-level `from pdclip.x import name` and an import inside a function.
    edges = {(m, d) for m, deps in graph.items() for d in deps}
    assert {("pdclip.study.report", "pdclip.study.tables"), ("pdclip.study.runner", "pdclip.features")} <= edges
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle in pdclip (A -> B: A imports B): {' -> '.join(reversed(err.args[1]))}")


def test_caches_live_in_the_checkout_or_the_users_cache_never_in_site_packages(tmp_path, monkeypatch):
    from pdclip.runtime import cache_dir

    monkeypatch.delenv("PDCLIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    checkout, installed = tmp_path / "checkout", tmp_path / "site-packages"
    (checkout / "pdclip").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'pdclip'\n")
    (installed / "pdclip").mkdir(parents=True)
    assert cache_dir("features", checkout / "pdclip") == checkout / ".cache" / "features"
    assert cache_dir("features", installed / "pdclip") == tmp_path / "xdg" / "pdclip" / "features"
    monkeypatch.setenv("PDCLIP_CACHE", str(tmp_path / "mine"))
    assert cache_dir("openclipart", installed / "pdclip") == tmp_path / "mine" / "openclipart"
    assert cache_dir("openclipart") == tmp_path / "mine" / "openclipart"  # this checkout too


def test_the_library_does_not_import_the_repository_tooling():
    """tools/ (the tutorial runner, the course renderer) is repository tooling, not installed with pdclip:
    no module under pdclip/ may import it."""
    assert not (ROOT / "pdclip" / "tutorial.py").exists() and not (ROOT / "pdclip" / "render.py").exists()
    assert {"tutorial.py", "render.py"} <= {p.name for p in (ROOT / "tools").glob("*.py")}
    offenders = []
    for path in ROOT.glob("pdclip/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tools" or n.startswith("tools.")]
    assert not offenders, f"pdclip imports the repository's tools/: {offenders}"


def test_every_module_fits_in_a_readers_head():
    """About 350 lines at most (nanoGPT's model.py is ~330): past that a module holds two concepts."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in [*ROOT.glob("pdclip/**/*.py"), *ROOT.glob("tools/*.py")]}
    assert len(sizes) > 30
    assert {name: n for name, n in sizes.items() if n > 375} == {}
