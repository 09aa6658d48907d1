"""The course can be followed: every notebook links out, and every `methods.md §N` reference resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "methods.md"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# "methods.md §4", "methods.md §1-5", "methods.md §3, §4": every number named must be a section.
REFERENCE = re.compile(r"methods\.md,? §(\d+)(?:\s*[-–]\s*§?(\d+))?((?:,\s*§\d+)*)")


def _sections() -> set[int]:
    return {int(n) for n in re.findall(r"^## (\d+)\. ", METHODS.read_text(), flags=re.MULTILINE)}


def _references() -> list[tuple[str, int]]:
    """(file, section) for every `methods.md §N` in pdclip/, docs/, notebooks/ and README.md."""
    files = [ROOT / "README.md", *ROOT.glob("pdclip/**/*.py"), *ROOT.glob("docs/**/*.md"), *NOTEBOOKS]
    found = []
    for path in files:
        for m in REFERENCE.finditer(path.read_text(encoding="utf-8")):
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            more = [int(n) for n in re.findall(r"\d+", m.group(3) or "")]
            found += [(str(path.relative_to(ROOT)), n) for n in [*range(first, last + 1), *more]]
    return found


def test_methods_page_exists_with_numbered_sections():
    assert METHODS.is_file(), "docs/methods.md is the reference the code cites"
    assert {1, 2, 3, 4, 5, 6, 7} <= _sections()


def test_every_methods_reference_names_a_section():
    refs = _references()
    assert refs, "expected docstrings to cite docs/methods.md §N"
    missing = sorted({(f, n) for f, n in refs if n not in _sections()})
    assert not missing, f"references to sections docs/methods.md does not have: {missing}"


def _markdown(path: Path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_links_out(path):
    """Every notebook's text links the web (its papers, the docs) and its neighbours in the course.

    Stricter than `grep -L http notebooks/*.ipynb` being empty: the Colab install cell's URL does not count.
    """
    text = _markdown(path)
    assert re.search(r"\]\(https?://", text), f"{path.name}: no link to a paper or a page in its text"
    k = NOTEBOOKS.index(path)
    for neighbour in (NOTEBOOKS[k - 1] if k else None, NOTEBOOKS[k + 1] if k + 1 < len(NOTEBOOKS) else None):
        if neighbour is not None:
            assert f"]({neighbour.name})" in text, f"{path.name}: no link to {neighbour.name}"


def test_readme_links_the_methods_and_results():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/methods.md)" in readme and "(docs/results.md)" in readme
