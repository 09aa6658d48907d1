"""The study's report: the generated blocks of `docs/results.md` and their figures.

Everything here reads finished results (`pdclip.study.results.load_results`) and computes nothing but
summaries of them (`pdclip.study.tables`, `pdclip.study.figures`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pdclip.study.figures import make_figures
from pdclip.study.presets import PRESETS, expand
from pdclip.study.results import load_results
from pdclip.study.tables import MIN_EFFECT, ZS_NOTE, gains_table, results_table, summary_table


def experiment_section(name: str, experiment: dict, rows: list[dict]) -> list[str]:
    """The markdown of one experiment: results table, paired gains and the verdicts they support."""
    if not rows:
        return [f"### Experiment `{name}`", "", "No finished runs yet.", ""]
    by = "variant" if "variants" in experiment else "method"
    # An ablation chooses on validation data: its gains table leads with the validation columns.
    columns = ("val ZS", "val R@1 i→t", "ZS", "R@1 i→t", "R@1 t→i", "linear probe") if by == "variant" else (
        "ZS", "R@1 i→t", "R@1 t→i", "linear probe")
    gains, verdicts = gains_table(rows, by, columns)
    return [f"### Experiment `{name}`", "", *results_table(rows), "",
            "Target precision: the share of the soft targets' off-diagonal mass that lands on captions that "
            "truly describe the image, at the end of training; chance: that share for mass spread uniformly. "
            "For PSD it scores the teacher's predictions; with `psd_teacher=self` those are the student's own.", "",
            f"Paired gain over {'CLIP' if by == 'method' else 'the default variant'} "
            "(same seed: same initialisation and batches); **bold**: a verdict:", "", *gains, "",
            f"Differences whose 95 % CI excludes zero and that exceed {MIN_EFFECT:g} point: "
            + ("; ".join(verdicts) if verdicts else "none") + ".", ""]


def write_report(preset_name: str, out: Path, results_path: Path, figures: Path) -> Path:
    """Write every finished cell of a preset into its marked block of `results_path`, and the figures.

    Text outside the block `<!-- study:{preset}:begin -->` ... `end -->` is kept (it is hand-written).
    """
    preset = PRESETS[preset_name]
    cells = expand(preset)
    rows = load_results(out, cells)
    if not rows:
        raise FileNotFoundError(f"no finished cells under {out}/cells; run the study first")
    wall = sum(r["wall_s"] for r in rows)
    lines = [f"## Preset `{preset_name}`: {preset['about']}", "",
             f"{len(rows)} of {len(cells)} runs finished; {wall / 60:.0f} min of run time in all "
             f"(mean {wall / len(rows):.0f} s per run, {np.mean([r['train_s'] for r in rows]):.0f} s of it "
             f"training), shared settings: `{json.dumps(preset['base'])}`. Test split, mean ± 95 % CI "
             f"(t-distribution) over seeds, in percent; each condition's *chance* row is what a model that "
             f"knows nothing scores. {ZS_NOTE}.", ""]
    comparisons = [r for r in rows if any("variants" not in preset["experiments"][e] for e in r["cell"]["experiments"])]
    if comparisons:  # every method against CLIP, one table per headline column
        lines += ["### Summary: paired gain over CLIP, every condition of the method comparisons", "",
                  f"Mean ± 95 % CI over seeds, in points; **bold**: the CI excludes zero and |Δ| > {MIN_EFFECT:g}.",
                  ""]
        for column in ("ZS", "R@1 i→t", "linear probe"):
            lines += [*summary_table(comparisons, column), ""]
    for name, experiment in preset["experiments"].items():
        lines += experiment_section(name, experiment, [r for r in rows if name in r["cell"]["experiments"]])
    rel = Path(os.path.relpath(figures, results_path.parent))
    lines += [f"![{title}]({(rel / name).as_posix()})" for title, name in make_figures(preset_name, rows, figures).items()]
    text = results_path.read_text() if results_path.exists() else ""
    begin, end = f"<!-- study:{preset_name}:begin -->", f"<!-- study:{preset_name}:end -->"
    block = "\n".join([begin, *lines, "", end])
    text = (text.split(begin)[0] + block + text.split(end)[1]) if begin in text and end in text else text + block + "\n"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(text)
    return results_path
