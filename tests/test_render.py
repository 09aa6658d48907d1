"""The rendered course: every executed notebook becomes a self-contained page, linked from an index,
and a real (headless) Chromium shows each page with its figures loaded."""

import base64
import io
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from pdclip.render import REPO_URL, render_course

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
