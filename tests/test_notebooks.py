"""The tutorial notebooks: committed clean, well-formed, and executed in smoke mode with papermill.

Each notebook writes `<out_dir>/<name>.json` with its results; the checks below assert on those
numbers, so a notebook that runs but teaches something false fails here too.
"""

import json
import math
from pathlib import Path

import nbformat
import pytest

from pdclip.data.clipart import DEFAULT_ROOT, cache_paths
from tools.render import REPO_ROOT, page_problems, render_notebook
from tools.tutorial import MEMORY_LIMIT_MB, NOTEBOOK_DIR, margin, run_notebook

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CLIPART_READY = cache_paths(NOTEBOOK_DIR.parent / DEFAULT_ROOT, 64)[0].exists()
NEEDS_CLIPART = ("05", "06", "08")
SMOKE_PEAKS: dict[str, float] = {}  # notebook -> peak memory (MB) of its smoke run  # 00 reports a missing clip art itself
CELL_TIMEOUT_S = 180


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


# What each notebook's JSON must say; the notebook asserts the same claims on its full run.
CHECKS = {
    "00": lambda r: r["torch"] and r["clipart_pairs"] >= 0 and r["true_off_diagonal"] >= 0,
    "01": lambda r: (r["max_diff_pdclip"] < 1e-5 and r["max_diff_open_clip"] < 1e-5
                     and abs(r["loss_at_t0"] - r["log_batch_size"]) < 1e-4),
    "02": lambda r: (r["diff_identity"] < 1e-5 and abs(r["ls_final_loss"] - r["ls_floor"]) < 0.01
                     and r["kd_mass_same_concept"] > 2 * r["ls_mass_same_concept"]
                     and r["multi_positive_change_identical"] < 1e-5 < 0.01 < r["multi_positive_change_differing"]),
    "03": lambda r: (all(0.0 <= r[f"{v}_concept_acc"] <= 1.0 for v in ("naive", "clip", "psd"))
                     and r["identity_max_diff"] < 1e-6 and r["control_cos_gap"] < 1e-12 < r["default_cos_gap"]
                     and all(0.0 <= r[f"dose_{v}_heldout_best"] <= 1.0 for v in ("clip", "psd", "psd_strong"))),
    "04": lambda r: (r["pdclip_vs_pot"] < 1e-6 and r["otter_targets_vs_hand"] < 1e-6
                     and r["unmasked_diagonal_mass"] > 0.9 and r["masked_same_concept_mass"] > 0.9),
    # 06-08 train frozen pretrained towers (cached features): every method at least 3x chance on retrieval
    # (06: clip-art zero-shot from titles alone needs the full run, which asserts it), above the
    # from-scratch contrast; 07's teachers point at true matches.
    "06": lambda r: (all(r[f"{m}_i2t_R@1"] > 3 * r["chance_R@1"]
                         for m in ("clip", "psd", "otter_paper_start", "otter_clip_start"))
                     and r["clip_i2t_R@1"] > r["scratch_i2t_R@1"]),
    # (07's frozen-vs-scratch OTTER contrast is asserted on its full run only: too few smoke steps.)
    "07": lambda r: max(r["psd_precision"], r["otter_precision"]) > 2 * r["chance_precision"],
    "08": lambda r: (all(r[f"{m}_zeroshot"] > 3 * r["chance_zeroshot"] for m in ("clip", "ls", "kd", "psd", "otter"))
                     and all(r[f"{m}_probe"] > 2 * r["chance_probe"] for m in ("clip", "ls", "kd", "psd", "otter"))),
    # 09 trains both recipes on local shards: checkpoints written, one feature file per shard, a cut-short
    # shard refused, and the frozen recipe's held-out retrieval above chance (R@k = k/N).
    "09": lambda r: (r["frozen_checkpoint"] and r["full_checkpoint"] and r["feature_files"] == r["n_shards"]
                     and r["truncated_shard_rejected"] and r["frozen_i2t_R@5"] > r["chance_R@5"]
                     and r["frozen_t2i_R@5"] > r["chance_R@5"] and r["full_i2t_R@10"] >= 0
                     and r["tower_pairs_per_s"] > 0 and r["head_pairs_per_s"] > r["tower_pairs_per_s"]),
}


def test_there_are_ten_ordered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_structure(path):
    nb = _read(path)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert "smoke: bool = False" in tagged[0].source and "out_dir: str" in tagged[0].source
    assert "google.colab" in next(c for c in nb.cells if c.cell_type == "code").source, "first code cell: Colab"
    headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
                if line.startswith("## ")]
    assert headings[-2:] == ["## Summary", "## Exercises"], f"{path.name} must end with Summary, Exercises"


def test_one_colab_setup_and_one_clipart_location():
    """Every notebook opens with the same Colab cell, and none names its own clip-art folder: all read
    pdclip's default (`DEFAULT_ROOT`), on Colab too, where `../.cache` would be another folder."""
    firsts = {next(c for c in _read(p).cells if c.cell_type == "code").source for p in NOTEBOOKS}
    assert len(firsts) == 1, f"the first code cells differ: {firsts}"
    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in _read(path).cells if c.cell_type == "code")
        assert ".cache/openclipart" not in code, f"{path.name} names a clip-art folder; use DEFAULT_ROOT"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_smoke_mode(path, tmp_path):
    prefix = path.name[:2]
    if prefix in NEEDS_CLIPART and not CLIPART_READY:
        pytest.skip("clip art not decoded; run `make clipart`")
    run = run_notebook(path, tmp_path, smoke=True, timeout=CELL_TIMEOUT_S)
    assert run.error is None, f"{path.name} failed ({run.error}); see {run.output}"
    SMOKE_PEAKS[run.name] = run.peak_mb  # printed at the end of the session (conftest.py)
    assert run.peak_mb < MEMORY_LIMIT_MB, f"{path.name} peaked at {run.peak_mb:.0f} MB (margin {margin(run.peak_mb):.0%})"
    results = json.loads((tmp_path / f"{path.stem}.json").read_text())
    assert all(not isinstance(v, float) or math.isfinite(v) for v in results.values())
    if prefix in CHECKS:
        assert CHECKS[prefix](results), f"{path.name}: results contradict the notebook's claims: {results}"
    # The page a reader sees (`make tutorial` renders the same): hints inside their <details>, no stderr
    # box (warnings, logs), no `Out[n]:` of a bare integer, no absolute path of the run's folder or the repo.
    page = render_notebook(run.output)
    assert page_problems(page) == [], f"{path.name}'s page: {page_problems(page)}"
    assert str(tmp_path) not in page and str(REPO_ROOT) not in page, f"{path.name}'s page shows an absolute path"


def test_binder_environment_is_the_projects():
    root = NOTEBOOK_DIR.parent
    assert (root / "binder" / "environment.yml").read_text() == (root / "environment.yml").read_text()


def test_summary_lists_runs_and_tables(tmp_path):
    from tools.tutorial import RunResult, write_summary

    (tmp_path / "08_x.png").write_bytes(b"")
    runs = [RunResult("08_x", tmp_path / "08_x.ipynb", 1.5, 900.0, None,
                      {"acc": 0.5, "table": [{"model": "clip", "acc": 0.5}]}, maxrss_mb=1400.0, imports_mb=480.0),
            RunResult("09_y", tmp_path / "09_y.ipynb", 2.0, 800.0, "cell [3] AssertionError: no"),
            RunResult("10_z", tmp_path / "10_z.ipynb", 2.0, MEMORY_LIMIT_MB + 1.0)]
    text = write_summary(runs, tmp_path, smoke=True).read_text()
    assert "| [08_x](08_x.ipynb) | 1.5 | 480 | 900 | 41% | 1400 | ok | acc=0.5 |" in text
    assert "FAILED: cell [3] AssertionError: no" in text
    assert f"FAILED: peak memory {MEMORY_LIMIT_MB + 1} MB is over the {MEMORY_LIMIT_MB} MB limit" in text
    assert "| clip | 0.500 |" in text and "![08_x](08_x.png)" in text
    assert [r.ok for r in runs] == [True, False, False]


def test_kernel_memory_counts_a_childs_anonymous_memory_not_its_libraries():
    """A child imports torch, notes its own memory, then fills 300 MiB: the sampler's peak is that note
    plus the 300 MiB, whatever torch's import costs on this machine (threads and allocator arenas vary,
    and the import's transient peak with them), and it leaves out the library pages resident beside it."""
    import subprocess
    import sys

    from tools.tutorial import KernelMemory

    code = ("import json, re, time, torch\n"
            "def rss():\n"
            "    status = open('/proc/self/status').read()\n"
            "    return {k: int(v) / 1024 for k, v in re.findall(r'^(Rss\\w+):\\s+(\\d+) kB', status, re.M)}\n"
            "before = rss()\nx = torch.ones(300 * 2**20 // 4)\ntime.sleep(0.5)\n"
            "print(json.dumps([before, rss()]))")
    # The child runs under a wrapper process, the sampler's root: whatever else pytest has running
    # below it (a kernel or a worker another test left to exit) is not counted.
    wrapper = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    proc = subprocess.Popen([sys.executable, "-c", wrapper, code], stdout=subprocess.PIPE, text=True)
    with KernelMemory(root=proc.pid, interval=0.005, refresh=0.05) as memory:
        stdout, _ = proc.communicate()
    assert proc.returncode == 0
    before, after = json.loads(stdout.splitlines()[-1])
    unreclaimable = {name: rss["RssAnon"] + rss["RssShmem"] for name, rss in (("before", before), ("after", after))}
    assert 290 < memory.peak_mb - unreclaimable["before"] < 330, (memory.peak_mb, before, after)
    assert abs(memory.peak_mb - unreclaimable["after"]) < 30, (memory.peak_mb, after)
    assert after["RssFile"] > 50, after  # torch's libraries are resident, and not in the peak


def test_notebook_imports_are_the_module_level_import_lines(tmp_path):
    from tools.tutorial import notebook_imports

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sys\nif 'google.colab' in sys.modules:\n    %pip install x\n    import y"),
        nbformat.v4.new_code_cell("from pathlib import (\n    Path,\n)\nimport json\nx = 1\nimport sys"),
    ])
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert notebook_imports(path).splitlines() == ["import sys", "from pathlib import Path", "import json"]
