"""Render executed notebooks as a small static course: one self-contained HTML page each, plus an index.

`python -m pdclip.render outputs` turns every executed `NN_*.ipynb` in `outputs/` (what
`python -m pdclip.tutorial --out outputs` writes) into `outputs/NN_*.html` and writes
`outputs/index.html`, which links every page in order. Open `index.html` in a browser; nothing else is
needed, offline included.

Why nbconvert and not Jupyter Book: the pages are built from notebooks that papermill has *already*
executed, in the same process that ran them, and must open from a plain folder (a CI artefact, Colab's
Files pane, an e-mail). nbconvert's `HTMLExporter` is already installed with papermill and Jupyter,
renders one notebook to one HTML string, and with `embed_images` inlines every figure as a
`data:` URI, so each page is a single file. Jupyter Book would add a Sphinx build, a `_config.yml`
and a `_toc.yml` to keep in sync with the notebooks, and writes a site whose pages share `_static/`
assets — more machinery than a ten-page course needs.

Links between notebooks (`01_clip_loss.ipynb`) are rewritten to the rendered pages
(`01_clip_loss.html`), and relative links into the repository (`../docs/methods.md`) to its GitHub
copy, so they work from the output folder too.
"""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

REPO_URL = "https://github.com/pdclip/pdclip/blob/main"
_NOTEBOOK_LINK = re.compile(r'href="(\d\d_\w+)\.ipynb(#[^"]*)?"')
_REPO_LINK = re.compile(r'href="\.\./((?:docs|notebooks|pdclip|binder)/[^"]*|README\.md[^"]*)"')


def notebook_title(nb) -> str:
    """The first Markdown `# ` heading of a notebook, or "" when it has none."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return ""


def _fix_links(page: str, rendered: set[str]) -> str:
    """Point notebook links at the rendered pages and repository links at GitHub."""
    def to_page(m: re.Match) -> str:
        name, anchor = m.group(1), m.group(2) or ""
        return f'href="{name}.html{anchor}"' if name in rendered else f'href="{REPO_URL}/notebooks/{name}.ipynb{anchor}"'

    page = _NOTEBOOK_LINK.sub(to_page, page)
    return _REPO_LINK.sub(lambda m: f'href="{REPO_URL}/{m.group(1)}"', page)


def render_notebook(path: Path, rendered: set[str] | None = None) -> str:
    """One executed notebook as a standalone HTML page (images inlined as `data:` URIs)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    exporter = HTMLExporter(embed_images=True)
    page, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook_title(nb) or path.stem}})
    return _fix_links(page, rendered if rendered is not None else {path.stem})


def _index_page(entries: list[tuple[str, str]]) -> str:
    items = "\n".join(f'    <li><a href="{html.escape(name)}.html">{html.escape(title or name)}</a></li>'
                      for name, title in entries)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>pdclip — the course</title>
  <style>body {{ font-family: sans-serif; max-width: 44em; margin: 2em auto; line-height: 1.5; }}</style>
</head>
<body>
  <h1>pdclip — soft-target contrastive image–text training</h1>
  <p>The executed notebooks, in order. Method details:
    <a href="{REPO_URL}/docs/methods.md">docs/methods.md</a>; what the study measured:
    <a href="{REPO_URL}/docs/results.md">docs/results.md</a>.</p>
  <ol start="0">
{items}
  </ol>
</body>
</html>
"""


def render_course(out_dir: Path) -> Path:
    """Write `NN_*.html` for every executed `NN_*.ipynb` in `out_dir`, and `index.html` linking them.

    Args:
        out_dir: a folder of executed notebooks (e.g. the tutorial runner's `--out`).

    Returns:
        The path of `index.html`.
    """
    import nbformat

    out_dir = Path(out_dir)
    notebooks = sorted(out_dir.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed notebooks NN_*.ipynb in {out_dir}")
    rendered = {p.stem for p in notebooks}
    entries = []
    for path in notebooks:
        path.with_suffix(".html").write_text(render_notebook(path, rendered), encoding="utf-8")
        entries.append((path.stem, notebook_title(nbformat.read(path, as_version=4))))
    index = out_dir / "index.html"
    index.write_text(_index_page(entries), encoding="utf-8")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder of executed notebooks (e.g. outputs)")
    args = parser.parse_args(argv)
    print(f"wrote {render_course(args.out_dir)}")


if __name__ == "__main__":
    main()
