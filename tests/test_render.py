"""The rendered course: every executed notebook becomes a self-contained page, linked from an index,
and a real (headless) Chromium shows each page with its figures loaded."""

import base64
import io
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from tools.render import REPO_URL, render_course

NAMES = ("00_first", "01_second")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _png(width: int) -> str:
    """A small PNG figure, base64-encoded as Jupyter stores it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width / 100, 1.0), dpi=100)
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def course(tmp_path) -> Path:
    """Two executed notebooks with a figure each, linking each other and the docs; rendered."""
    for k, name in enumerate(NAMES):
        other = NAMES[1 - k]
        figure = new_output("display_data", data={"image/png": _png(200 + 40 * k), "text/plain": "<Figure>"})
        nb = new_notebook(cells=[
            new_markdown_cell(f"# {name} · a lesson\n\nNext: [{other}]({other}.ipynb); "
                              "the equations: [methods](../docs/methods.md)."),
            new_markdown_cell("## Exercises\n\n<details><summary>Hint 1</summary>\n\nThe secret hint.\n\n</details>"),
            new_code_cell("plt.plot([0, 1])", execution_count=1, outputs=[figure]),
        ])
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    render_course(tmp_path)
    return tmp_path


def test_pages_are_self_contained_and_linked(course):
    index = (course / "index.html").read_text()
    for k, name in enumerate(NAMES):
        assert f'href="{name}.html"' in index and f"{name} · a lesson" in index
        page = (course / f"{name}.html").read_text()
        assert 'src="data:image/png;base64,' in page  # the figure travels inside the page
        assert f'href="{NAMES[1 - k]}.html"' in page and ".ipynb" not in page.split("<body")[1]
        assert f'href="{REPO_URL}/docs/methods.md"' in page


def test_render_course_needs_notebooks(tmp_path):
    with pytest.raises(FileNotFoundError):
        render_course(tmp_path)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.timeout(180)
def test_chromium_shows_every_page_with_its_figures(course, browser):
    from selenium.webdriver.common.by import By

    browser.get((course / "index.html").as_uri())
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "ol a")]
    assert [Path(link).name for link in links] == [f"{name}.html" for name in NAMES]
    for link in links:
        browser.get(link)
        images = browser.find_elements(By.TAG_NAME, "img")
        assert images, f"{link}: no figure"
        for image in images:
            loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
            assert loaded and loaded > 0, f"{link}: an image did not load"
        assert "a lesson" in browser.title or "a lesson" in browser.find_element(By.TAG_NAME, "h1").text
        hint = browser.find_element(By.CSS_SELECTOR, "details p")  # inside its <details>, hidden until clicked
        assert "secret hint" in hint.get_attribute("textContent") and not hint.is_displayed()
        assert "secret hint" not in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.CSS_SELECTOR, "details summary").click()
        assert hint.is_displayed()


# --- What a reader must not see: hints spilled out of their <details>, stderr boxes, bare-integer outputs,
# absolute paths. The executed notebooks' pages are checked in tests/test_notebooks.py's smoke runs.

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("path", sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_hint_stays_inside_its_details(path):
    """The committed notebooks' hints are Markdown with blank lines inside `<details>` (as Jupyter, Colab
    and GitHub show them); each rendered page keeps every hint inside its closed `<details>`."""
    from tools.render import page_problems, render_notebook

    nb = nbformat.read(path, as_version=4)
    hints = [c.source.count("<details>") for c in nb.cells if c.cell_type == "markdown"]
    page = render_notebook(path)
    assert page_problems(page) == []
    assert page.count("<details>") == sum(hints)
    for body in re.findall(r"</summary>(.*?)</details>", page, re.DOTALL):
        assert "<p>" in body or "<pre>" in body, body  # the hint's Markdown is rendered, not shown raw


def _executed(tmp_path, outputs) -> Path:
    cells = [new_markdown_cell("# 00 · t\n\n## Exercises\n\n1. Why?\n\n<details><summary>Hint 1</summary>\n\n"
                               "Look at `x`; then\n\n```python\na = 1\n\nb = 2\n```\n\n</details>")]
    cells += [new_code_cell("x", execution_count=k, outputs=[o]) for k, o in enumerate(outputs, 1)]
    nb = new_notebook(cells=cells, metadata={"pdclip": {"summary": "What `x` is, in one line."}})
    path = tmp_path / "00_t.ipynb"
    nbformat.write(nb, path)
    return path


def test_page_problems_finds_stderr_bare_integers_spilled_hints_and_absolute_paths(tmp_path):
    from tools.render import REPO_ROOT, page_problems, render_notebook

    clean = _executed(tmp_path, [new_output("execute_result", data={"text/plain": "0.5"}, execution_count=1),
                                 new_output("stream", name="stdout", text="R@1 0.42 (chance 0.06)\n")])
    page = render_notebook(clean)
    assert page_problems(page) == []
    hint = page[page.index("<details>"):page.index("</details>")]
    assert "<code>x</code>" in hint and "b</span>" in hint  # rendered Markdown, the code block whole
    noisy = _executed(tmp_path, [new_output("execute_result", data={"text/plain": "217"}, execution_count=1),
                                 new_output("stream", name="stderr", text="WARNING:root:No pretrained weights\n")])
    assert sorted(p.split(":")[0] for p in page_problems(render_notebook(noisy))) == [
        "a bare integer output", "a stderr box"]
    spilled = page.replace(hint, "<details><summary>Hint 1</summary>\n")
    assert page_problems(spilled) == ["hint outside its <details>: 'Hint 1'"]
    assert page_problems(page + f"<pre>{REPO_ROOT}/.cache</pre>") == [f"an absolute path: {str(REPO_ROOT)!r}"]


def test_pages_show_no_absolute_paths(tmp_path):
    from tools.render import REPO_ROOT, render_notebook

    text = f"results in {tmp_path}/00_t.json; cache {REPO_ROOT}/.cache/features/a.npy\n"
    page = render_notebook(_executed(tmp_path, [new_output("stream", name="stdout", text=text)]))
    assert str(tmp_path) not in page and str(REPO_ROOT) not in page
    assert "results in ./00_t.json; cache .cache/features/a.npy" in page


def test_index_has_a_summary_and_the_time_of_every_notebook(tmp_path):
    _executed(tmp_path, [])
    index = render_course(tmp_path, times={"00_t": 75.4}).read_text()
    assert "What <code>x</code> is, in one line." in index and "(75 s to run here)" in index
    assert "how long it took to run here. 75 s in all." in index
    assert "to run here" not in render_course(tmp_path).read_text()  # no times given: none shown
