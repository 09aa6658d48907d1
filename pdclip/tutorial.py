"""Run the tutorial: execute notebooks 00–08 with papermill, measure each, write `summary.md`.

`python -m pdclip.tutorial --out outputs` (what `make tutorial` runs) executes every notebook in a fresh
process, prints its wall time and the peak memory of its kernel, and writes `outputs/summary.md`: the
per-notebook measurements, each notebook's headline results (from the small JSON it writes to its
`out_dir`) and links to the figures. `--smoke` passes `smoke=True` (what `tests/test_notebooks.py` does).

Peak memory is exact, not sampled: each notebook runs in a child process whose papermill starts the
kernel as *its* child and reaps it on shutdown, so that process's `getrusage(RUSAGE_CHILDREN).ru_maxrss`
is the kernel's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
TUTORIAL = tuple(f"{i:02d}" for i in range(9))  # 00–08; 09 (scaling up) is read, not run
MEMORY_LIMIT_MB = 1536  # mybinder.org guarantees 1 GB and restarts a kernel past 2 GB
TIME_LIMIT_S = 15 * 60  # the whole CPU tutorial on a 2-core machine


@dataclass
class RunResult:
    """One executed notebook: where it went, how long it took, its kernel's peak memory."""

    name: str
    output: Path
    seconds: float
    peak_mb: float
    error: str | None = None
    results: dict | None = None


def notebook_paths(prefixes: tuple[str, ...] = TUTORIAL, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The notebooks whose names start with one of `prefixes`, in order; raise if one is missing."""
    paths = []
    for prefix in prefixes:
        found = sorted(notebook_dir.glob(f"{prefix}_*.ipynb"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one notebook {notebook_dir}/{prefix}_*.ipynb, found {len(found)}")
        paths.append(found[0])
    return paths


def _execute(notebook: str, output: str, parameters: dict, timeout: int, queue) -> None:
    """Child-process body: run papermill, then report the kernel's peak RSS (KiB on Linux) or the error."""
    import papermill

    error = None
    try:
        papermill.execute_notebook(notebook, output, parameters=parameters, cwd=str(Path(notebook).parent),
                                   execution_timeout=timeout, progress_bar=False, kernel_name="python3")
    except papermill.PapermillExecutionError as e:  # a failing cell; the output notebook has the traceback
        error = f"cell [{e.exec_count}] {e.ename}: {e.evalue}"
    except Exception as e:  # the kernel died, a cell timed out, ...
        error = f"{type(e).__name__}: {e}"
    queue.put((resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, error))


def run_notebook(notebook: Path, out_dir: Path, smoke: bool = False, timeout: int = 1800) -> RunResult:
    """Execute `notebook` into `out_dir` with `out_dir` and `smoke` as parameters, measuring it.

    Args:
        notebook: the `.ipynb` to run; it is executed with its own folder as the working directory.
        out_dir: where the executed notebook, its JSON and its figures go.
        smoke: the notebook's `smoke` parameter (a shrunken run for tests).
        timeout: seconds allowed per cell.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / notebook.name
    parameters = {"out_dir": str(out_dir), "smoke": smoke}
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch state or threads inherited
    queue = ctx.Queue()
    start = time.perf_counter()
    proc = ctx.Process(target=_execute, args=(str(notebook), str(output), parameters, timeout, queue))
    proc.start()
    maxrss_kib, error = queue.get()
    proc.join()
    seconds = time.perf_counter() - start
    json_path = out_dir / f"{notebook.stem}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() and error is None else None
    return RunResult(notebook.stem, output, seconds, maxrss_kib / 1024, error, results)


def _headline(results: dict | None) -> str:
    """A notebook's scalar results as `key=value` pairs for the summary table."""
    if not results:
        return ""
    scalars = {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())


def write_summary(runs: list[RunResult], out_dir: Path, smoke: bool) -> Path:
    """Write `out_dir/summary.md`: measurements, headline results, the results table, the figures."""
    total = sum(r.seconds for r in runs)
    lines = ["# pdclip tutorial — summary", "",
             f"{'Smoke run' if smoke else 'Full CPU tutorial'}: {len(runs)} notebooks in {total:.0f} s "
             f"(limit {TIME_LIMIT_S} s); peak kernel memory per notebook (limit {MEMORY_LIMIT_MB} MB).", "",
             "| notebook | wall time (s) | peak memory (MB) | status | results |", "|---|---|---|---|---|"]
    for r in runs:
        status = "ok" if r.error is None else f"FAILED: {r.error}"
        lines.append(f"| [{r.name}]({r.output.name}) | {r.seconds:.1f} | {r.peak_mb:.0f} | {status} "
                     f"| {_headline(r.results)} |")
    for r in runs:  # the evaluation notebook's table of methods, when a notebook provides one
        table = (r.results or {}).get("table")
        if table:
            columns = list(table[0])
            lines += ["", f"## Results table ({r.name})", "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in table]
    figures = sorted(out_dir.glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    parser.add_argument("--smoke", action="store_true", help="pass smoke=True: a shrunken, quick run")
    parser.add_argument("--only", nargs="*", default=list(TUTORIAL), help="notebook prefixes, e.g. 03 04")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    runs = []
    for path in notebook_paths(tuple(args.only)):
        run = run_notebook(path, args.out, smoke=args.smoke, timeout=args.timeout)
        flag = "" if run.peak_mb <= MEMORY_LIMIT_MB else f"  OVER {MEMORY_LIMIT_MB} MB"
        print(f"{run.name:32s} {run.seconds:7.1f} s {run.peak_mb:7.0f} MB  "
              f"{'ok' if run.error is None else 'FAILED ' + run.error}{flag}", flush=True)
        runs.append(run)
    total = sum(r.seconds for r in runs)
    print(f"{'total':32s} {total:7.1f} s {max(r.peak_mb for r in runs):7.0f} MB (max)"
          f"{'  OVER ' + str(TIME_LIMIT_S) + ' s' if total > TIME_LIMIT_S else ''}")
    print(f"summary: {write_summary(runs, args.out.resolve(), args.smoke)}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
