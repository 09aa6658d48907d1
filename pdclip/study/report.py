"""The study's report: the generated blocks of `docs/results.md` and their figures.

Everything here reads finished results (`pdclip.study.results.load_results`) and computes nothing but
summaries of them (`pdclip.study.tables`, `pdclip.study.bootstrap`, `pdclip.study.figures`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pdclip.config import METHODS
from pdclip.study import tables
from pdclip.study.figures import make_figures
from pdclip.study.presets import PRESETS, expand
from pdclip.study.results import load_references, load_results
from pdclip.study.tables import (
    ZS_NOTE,
    gains_table,
    results_table,
    steps_table,
    summary_table,
    train_curve_table,
    val_gains_table,
)

RULE = (f"**bold**: a verdict, Holm-adjusted p < {tables.ALPHA:g} over the table's comparisons and "
        f"|Δ| ≥ {tables.MIN_EFFECT:g} "
        "point; [low, high]: 95 % paired-bootstrap interval over seeds and test images")
PRECISION_NOTE = ("Target precision: the share of the soft targets' off-diagonal mass that lands on captions that "
                  "truly describe the image, at the end of training; chance: that share for mass spread uniformly. "
                  "For PSD it scores the teacher's predictions; with `psd_teacher=self` those are the student's own.")

CURVE_NOTE = ("During training (percent, mean ± 95 % CI over seeds, each a window mean of the logged steps): "
              "*confidence*, the student's mean image→text softmax on the given caption of its own training "
              "batch; *off-diagonal mass*, the share of each target row put on other captions (PSD: α times "
              "its teacher's, averaged over all rows; CLIP: none). A self-teacher can only disagree with a "
              "noisy caption where confidence is low and the off-diagonal mass is not.")


def _verdicts(verdicts: list[str], n: int) -> str:
    return (f"Verdicts ({len(verdicts)} of {n} comparisons, Holm-corrected): "
            + ("; ".join(verdicts) if verdicts else "none") + ".")


def experiment_section(name: str, experiment: dict, rows: list[dict], references: dict) -> list[str]:
    """The markdown of one experiment: results table, paired gains and the verdicts they support."""
    if not rows:
        return [f"### Experiment `{name}`", "", "No finished runs yet.", ""]
    by = experiment.get("compare", "variant" if "variants" in experiment else "method")
    lines = [f"### Experiment `{name}`", "", *results_table(rows, references=references), "", PRECISION_NOTE, ""]
    if any(r.get("train_curve") for r in rows):
        lines += [CURVE_NOTE, "", *train_curve_table(rows), ""]
    if by == "variant":  # an ablation chooses on validation; its test columns are reported
        lines += ["Paired gain over the default variant on **validation** (mean ± 95 % t-CI over seeds; what the "
                  "ablation chooses on):", "", *val_gains_table(rows), ""]
    lines += [f"Paired gain on the test split over {'CLIP' if by == 'method' else 'the default variant'} "
              f"(same seed: same initialisation and batches); {RULE}:", ""]
    gains, verdicts, n = gains_table(rows, by)
    lines += [*gains, "", _verdicts(verdicts, n), ""]
    if "variants" in experiment and by == "method" and {} in experiment["variants"]:  # with and without it
        lines += ["What the variant changes, per method (paired by seed, over the default variant):", ""]
        verdicts, n, header = [], 0, True
        for method in METHODS:
            table, v, k = gains_table([r for r in rows if r["cell"]["method"] == method], "variant", prefix=f"{method}: ")
            lines += table if header else table[2:]
            header, verdicts, n = False, verdicts + v, n + k
        lines += ["", _verdicts(verdicts, n) + " (Holm within each method's comparisons.)", ""]
    return lines


def budget_section(comparisons: list[dict], base: dict) -> list[str]:
    """How the fixed-budget protocol compares: gains at the last step, and the steps validation chose."""
    table, n = summary_table(comparisons, "ZS", budget="final")
    return ["### Budgets: chosen on validation, against one fixed budget", "",
            f"Each run is evaluated at {len(base['eval_steps'])} steps up to {base['steps']} on **validation** "
            "only; its zero-shot columns are "
            "read at its best validation zero-shot step, its retrieval columns at its best validation R@1 "
            "step, its linear probe at the zero-shot step or the last, whichever gives the better validation "
            "probe accuracy. The mean step chosen (zero-shot / retrieval):", "", *steps_table(comparisons), "",
            f"The same comparison read at the last step ({base['steps']}), as a fixed-budget protocol would; {RULE}; "
            f"{n} comparisons:", "", *table, ""]


def write_report(preset_name: str, out: Path, results_path: Path, figures: Path) -> Path:
    """Write every finished cell of a preset into its marked block of `results_path`, and the figures.

    Text outside the block `<!-- study:{preset}:begin -->` ... `end -->` is kept (it is hand-written).
    """
    preset = PRESETS[preset_name]
    cells = expand(preset)
    rows = load_results(out, cells)
    if not rows:
        raise FileNotFoundError(f"no finished cells under {out}/cells; run the study first")
    references = load_references(out)
    wall = sum(r["wall_s"] for r in rows)
    selected = any(len(r["budgets"]) > 1 for r in rows)
    lines = [f"## Preset `{preset_name}`: {preset['about']}", "",
             f"{len(rows)} of {len(cells)} runs finished; {wall / 60:.0f} min of run time in all "
             f"(mean {wall / len(rows):.0f} s per run, {np.mean([r['train_s'] for r in rows]):.0f} s of it "
             f"training), shared settings: `{json.dumps(preset['base'])}`. Whole test splits, mean ± 95 % CI "
             f"(t-distribution) over seeds, in percent"
             + (", each column at the step chosen on validation for it" if selected else ", at the last step")
             + f"; each condition's *chance* row is what a model that knows nothing scores. {ZS_NOTE}.", ""]
    comparisons = [r for r in rows if any("variants" not in preset["experiments"][e] for e in r["cell"]["experiments"])]
    if comparisons:  # every method against CLIP, one table per headline column
        lines += ["### Summary: paired gain over CLIP, every condition of the method comparisons", "", f"{RULE}.", ""]
        for column in ("ZS", "R@1 i→t", "linear probe"):
            table, n = summary_table(comparisons, column)
            lines += [f"{column}, {n} comparisons:", "", *table, ""]
        if selected:
            lines += budget_section(comparisons, preset["base"])
    for name, experiment in preset["experiments"].items():
        lines += experiment_section(name, experiment, [r for r in rows if name in r["cell"]["experiments"]], references)
    rel = Path(os.path.relpath(figures, results_path.parent))
    lines += [f"![{title}]({(rel / name).as_posix()})" for title, name in make_figures(preset_name, rows, figures).items()]
    text = results_path.read_text() if results_path.exists() else ""
    begin, end = f"<!-- study:{preset_name}:begin -->", f"<!-- study:{preset_name}:end -->"
    block = "\n".join([begin, *lines, "", end])
    text = (text.split(begin)[0] + block + text.split(end)[1]) if begin in text and end in text else text + block + "\n"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(text)
    return results_path
