"""Render executed notebooks as a small static course: one self-contained HTML page each, plus an index.

`python -m tools.render outputs` turns every executed `NN_*.ipynb` in `outputs/` (what
`python -m tools.tutorial --out outputs` writes) into `outputs/NN_*.html` and writes
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

Hints. The notebooks write an exercise's hint as Markdown inside `<details>`, with blank lines around
it, as Jupyter, Colab and GitHub render it. nbconvert's Markdown renderer ends the HTML block at the
first blank line and closes the `<details>`, so the hint would show under a closed ▶; `render_notebook`
renders each hint's Markdown itself and hands nbconvert one `<details>` block without blank lines.
The executed folder's absolute path (papermill's injected `out_dir`) is shown as `.`, the folder the
page sits in, and paths inside the repository (feature caches) relative to its root. `page_problems`
lists what a page must not show (a hint outside its `<details>`, a stderr box, an `Out[n]:` that is a
bare integer); the tests call it on every rendered notebook.

The index gives each notebook its one-line summary (`metadata["pdclip"]["summary"]` of the notebook) and,
when `render_course` is given them, the seconds it took to execute.
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


_DETAILS = re.compile(r"<details>\s*(<summary>.*?</summary>)(.*?)</details>", re.DOTALL)


def _markdown_html(text: str) -> str:
    """Markdown as HTML, by the renderer nbconvert uses for the page (math left for MathJax)."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return markdown2html_mistune(text)


def fold_details(markdown: str) -> str:
    """`<details><summary>S</summary> markdown </details>` -> one HTML block with no blank line in it,
    its Markdown rendered (a blank line, in a code block, kept as an empty `<span>`), so that nbconvert
    keeps the hint inside the `<details>`."""
    def fold(m: re.Match) -> str:
        body = _markdown_html(m.group(2).strip())
        return "<details>" + m.group(1) + "\n" + re.sub(r"\n\s*\n", "\n<span></span>\n", body.strip()) + "\n</details>"

    return _DETAILS.sub(fold, markdown)


REPO_ROOT = Path(__file__).resolve().parent.parent


def _relative_paths(nb, folder: Path) -> None:
    """No absolute paths on a page: in sources and text outputs the executed notebook's folder becomes
    `.` and a path inside the repository (a feature cache) relative to its root."""
    absolute, root = str(Path(folder).resolve()), str(REPO_ROOT)

    def rel(text: str) -> str:
        return text.replace(absolute + "/", "./").replace(absolute, ".").replace(root + "/", "")

    for cell in nb.cells:
        cell.source = rel(cell.source)
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = rel(output["text"])
            if "text/plain" in output.get("data", {}):
                output["data"]["text/plain"] = rel(output["data"]["text/plain"])


def render_notebook(path: Path, rendered: set[str] | None = None) -> str:
    """One executed notebook as a standalone HTML page (images inlined as `data:` URIs), its hints
    folded inside their `<details>` and its own folder's absolute path shown as `.`."""
    import nbformat
    from nbconvert import HTMLExporter

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "<details>" in cell.source:
            cell.source = fold_details(cell.source)
    _relative_paths(nb, path.parent)
    exporter = HTMLExporter(embed_images=True)
    page, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook_title(nb) or path.stem}})
    return _fix_links(page, rendered if rendered is not None else {path.stem})


_STDERR = 'data-mime-type="application/vnd.jupyter.stderr"'
_BARE_INT = re.compile(r'Out\[\d+\]:</div>\s*<div class="[^"]*jp-OutputArea-executeResult[^"]*"[^>]*>\s*'
                       r'<pre>\s*-?\d+\s*</pre>')
_PAGE_DETAILS = re.compile(r"<details>\s*<summary>(.*?)</summary>(.*?)</details>", re.DOTALL)


def page_problems(page: str) -> list[str]:
    """What a rendered page must not show: a `<details>` with nothing inside but its summary (the hint
    spilled out under it), a stderr box (warnings, logs), an `Out[n]:` that is a bare integer (the
    return value of `write_text`, `gc.collect()`), this checkout's absolute path. Empty for a clean page."""
    problems = [f"hint outside its <details>: {summary!r}" for summary, body in _PAGE_DETAILS.findall(page)
                if not re.sub(r"<[^>]+>", "", body).strip()]
    problems += ["a stderr box"] * page.count(_STDERR)
    problems += [f"a bare integer output: {m.group(0)[-40:]!r}" for m in _BARE_INT.finditer(page)]
    problems += [f"an absolute path: {str(REPO_ROOT)!r}"] * page.count(str(REPO_ROOT))
    return problems


def notebook_summary(nb) -> str:
    """A notebook's one-line summary: `metadata["pdclip"]["summary"]`, else its `## Summary`'s first point."""
    summary = nb.metadata.get("pdclip", {}).get("summary", "")
    if summary:
        return summary
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "## Summary" in cell.source:
            points = cell.source.split("## Summary", 1)[1].strip().split("\n- ")
            return " ".join(points[0].removeprefix("- ").split()) if points[0] else ""
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _inline_markdown(text: str) -> str:
    """One line of Markdown as inline HTML (code spans, emphasis), without the paragraph around it."""
    return _markdown_html(text).strip().removeprefix("<p>").removesuffix("</p>")


def _index_page(entries: list[tuple[str, str, str, float | None]]) -> str:
    def item(name: str, title: str, summary: str, seconds: float | None) -> str:
        took = "" if seconds is None else f' <span class="time">({_duration(seconds)} to run here)</span>'
        line = f" — {_inline_markdown(summary)}" if summary else ""
        return f'    <li><a href="{html.escape(name)}.html">{html.escape(title or name)}</a>{line}{took}</li>'

    items = "\n".join(item(*entry) for entry in entries)
    measured = [s for *_, s in entries if s is not None]
    timed = ", and how long it took to run here" if measured else ""
    total = f" {_duration(sum(measured))} in all." if measured and len(measured) == len(entries) else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>pdclip — the course</title>
  <style>body {{ font-family: sans-serif; max-width: 48em; margin: 2em auto; line-height: 1.5; }}
    li {{ margin-bottom: 0.5em; }} .time {{ color: #666; white-space: nowrap; }}</style>
</head>
<body>
  <h1>pdclip — soft-target contrastive image–text training</h1>
  <p>The executed notebooks, in order: what each shows{timed}.{total}
    Method details: <a href="{REPO_URL}/docs/methods.md">docs/methods.md</a>; what the study measured:
    <a href="{REPO_URL}/docs/results.md">docs/results.md</a>.</p>
  <ol start="0">
{items}
  </ol>
</body>
</html>
"""


def render_course(out_dir: Path, times: dict[str, float] | None = None) -> Path:
    """Write `NN_*.html` for every executed `NN_*.ipynb` in `out_dir`, and `index.html` linking them.

    Args:
        out_dir: a folder of executed notebooks (e.g. the tutorial runner's `--out`).
        times: seconds each notebook took to execute, keyed by its name (`"03_psd"`) or prefix (`"03"`),
            shown beside it in the index; a notebook missing from it (or `times=None`) shows no time.

    Returns:
        The path of `index.html`.
    """
    import nbformat

    out_dir = Path(out_dir)
    notebooks = sorted(out_dir.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed notebooks NN_*.ipynb in {out_dir}")
    rendered = {p.stem for p in notebooks}
    times = times or {}
    entries = []
    for path in notebooks:
        path.with_suffix(".html").write_text(render_notebook(path, rendered), encoding="utf-8")
        nb = nbformat.read(path, as_version=4)
        seconds = times.get(path.stem, times.get(path.stem[:2]))
        entries.append((path.stem, notebook_title(nb), notebook_summary(nb), seconds))
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
