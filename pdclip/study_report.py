"""The study's report: tables, figures and the generated blocks of `docs/results.md`.

Everything here reads finished results (`pdclip.study.load_results`) and computes nothing but
summaries of them: mean +- 95 % CI over seeds, paired gains over a baseline, and the verdicts those
support (a difference is called a gain or a loss only when its interval excludes zero).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdclip.config import METHODS
from pdclip.study import (
    CONTROLS,
    HEADLINE,
    PRESETS,
    aggregate,
    expand,
    headline,
    load_results,
    paired_gains,
    run_effective_robustness,
)

# ---------------------------------------------------------------- tables and figures

COLUMNS = {  # table column -> metric key ("{h}" = the dataset's headline zero-shot score, `headline`)
    "val ZS": "val/{h}", "val R@1 i→t": "val/retrieval/i2t_R@1", "ZS": "test/{h}", "ZS hit@1": "test/{hit}",
    "R@1 i→t": "test/retrieval/i2t_R@1", "R@1 t→i": "test/retrieval/t2i_R@1", "linear probe": "linear_probe/acc",
}
ZS_NOTE = ("ZS: zero-shot top-1 on the synthetic source's 48 colour×shape classes; on clip art, whose 16 "
           "classes are unbalanced, balanced accuracy (mean per-class recall)")


def metric(row: dict, column: str, prefix: str = "") -> float | None:
    """A `COLUMNS` entry of a result row, in percent (None when the dataset lacks it); with
    `prefix="chance/"` its chance level (`pdclip.evaluate.evaluate_model`)."""
    h = headline(row["cell"]["dataset"])
    hit = h.replace("top1", "hit@1") if h.endswith("top1") else "none"
    value = row["metrics"].get(prefix + COLUMNS[column].format(h=h, hit=hit))
    return None if value is None else 100 * value


def final_quality(row: dict, key: str = "i2t/offdiag_precision") -> float | None:
    """The soft-target quality of a run's last snapshot, in percent (None without off-diagonal mass)."""
    value = row["target_quality"][-1].get(key) if row["target_quality"] else None
    return None if value is None else 100 * value


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def plot_sweep(rows: list[dict], x_field: str, columns: Sequence[str], path: Path, gains: bool = False) -> str:
    """Mean +- 95 % CI of `columns` (or their paired gains over CLIP) against a cell field, per method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), layout="constrained")
    for ax, column in zip(np.atleast_1d(axes), columns, strict=True):
        table = (paired_gains if gains else aggregate)(rows, lambda r, c=column: metric(r, c))
        for i, method in enumerate(METHODS):
            pts = sorted((g[2] if x_field == "noise" else g[3], *by[method][:2])
                         for g, by in table.items() if method in by)
            if pts:
                xs, ys, err = np.array(pts, dtype=float).T
                ax.errorbar(xs + 0.012 * (i - 2) * (xs.max() - xs.min() or 1), ys, yerr=np.nan_to_num(err),
                            marker="o", capsize=3, label=method, color=f"C{i}")
        if gains:
            ax.axhline(0, color="0.5", lw=1, ls=":")
        ax.set_xlabel({"noise": "caption noise rate ν", "n_train": "training pairs"}[x_field])
        ax.set_ylabel(f"{column} {'gain over CLIP (points)' if gains else '(%)'}")
        if ax.get_legend_handles_labels()[0]:  # a sweep without CLIP runs has no gains to draw
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_robustness(rows: list[dict], path: Path) -> str | None:
    """Shift vs test headline accuracy: every CLIP run (grey squares, they fix the trend, as in the
    tables) and one point per other (method, noise), averaged over seeds, coloured by method."""
    from pdclip.viz import plot_effective_robustness

    rows = [r for r in rows if f"shift/{HEADLINE}" in r["metrics"]]
    acc = lambda r: (r["metrics"][f"test/{HEADLINE}"], r["metrics"][f"shift/{HEADLINE}"])  # noqa: E731
    base = np.array([acc(r) for r in rows if r["cell"]["method"] == "clip"])
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["cell"]["method"] != "clip":
            groups.setdefault((r["cell"]["method"], r["cell"]["noise"]), []).append(acc(r))
    if len({a for a, _ in base}) < 2 or not groups:
        return None
    # 20 (method, noise) points crowd each other: colour says the method, no text labels.
    ax = plot_effective_robustness(base[:, 0], base[:, 1], ["clip"] * len(base), ["clip"],
                                   title="Effective robustness (colour+shape top-1)")
    for i, method in enumerate(METHODS):
        points = np.array([np.mean(v, axis=0) for (m, _), v in groups.items() if m == method])
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], color=f"C{i}", zorder=4, label=f"{method} (one ν each)")
    for text in list(ax.texts):  # the baselines' "clip" labels
        text.remove()
    handles = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True) if lab != "models"]
    ax.legend(*zip(*handles, strict=True), fontsize=7, loc="upper left")  # "models": the empty non-baselines
    return _save(ax.figure, path)


def plot_target_quality(rows: list[dict], path: Path) -> str | None:
    """Soft-target quality over training at the noisiest level, mean over seeds, per method."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["target_quality"]]
    if not rows:
        return None
    noisiest = max(r["cell"]["noise"] for r in rows)
    rows = [r for r in rows if r["cell"]["noise"] == noisiest]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), layout="constrained")
    for ax, key, label in ((axes[0], "i2t/true_mass", "target mass on true pairs"),
                           (axes[1], "i2t/offdiag_precision", "off-diagonal precision")):
        for i, method in enumerate(METHODS):
            runs = [r["target_quality"] for r in rows if r["cell"]["method"] == method]
            steps = sorted({q["step"] for run in runs for q in run if key in q})
            if steps:
                ys = [np.mean([q[key] for run in runs for q in run if q["step"] == s and key in q]) for s in steps]
                ax.plot(steps, 100 * np.array(ys), marker=".", label=method, color=f"C{i}")
        chance = key.replace("offdiag_precision", "chance_offdiag_precision").replace("true_mass", "chance_true_mass")
        ax.axhline(100 * np.mean([q[chance] for r in rows for q in r["target_quality"]]), color="0.5", ls=":",
                   label="chance")
        ax.set(xlabel="step", ylabel=f"{label} (%)", title=f"ν = {noisiest:g}")
        ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- the markdown report


def _cell_text(stat: tuple, signed: bool = False) -> str:
    mean, half, n = stat
    if n == 0:
        return "–"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return text + ("" if math.isnan(half) else f" ± {half:.1f}")


def condition(group: tuple) -> str:
    dataset, setting, noise, n_train, variant = group
    parts = [dataset, setting] + ([f"ν={noise:g}"] if noise is not None else []) + (
        [f"n={n_train}"] if n_train is not None else [])
    extra = [f"{k}={v}" for k, v in json.loads(variant).items()]
    return ", ".join(parts + extra + ([f"({CONTROLS[variant]})"] if variant in CONTROLS else []))


def results_table(rows: list[dict]) -> list[str]:
    """Markdown rows: mean ± 95 % CI over seeds of every column, one row per (condition, method)."""
    cols = {c: aggregate(rows, lambda r, c=c: metric(r, c)) for c in COLUMNS}
    er = run_effective_robustness(rows)
    cols["eff. robustness"] = aggregate(rows, lambda r: 100 * er[r["cell"]["id"]] if r["cell"]["id"] in er else None)
    cols["target precision"] = aggregate(rows, final_quality)
    # Chance depends on the noise: vague captions truly describe many images.
    cols["chance precision"] = aggregate(rows, lambda r: final_quality(r, "i2t/chance_offdiag_precision"))
    # A score means something only next to what a model that knows nothing gets (the same for every method).
    chance = {c: aggregate(rows, lambda r, c=c: metric(r, c, "chance/")) for c in COLUMNS}
    lines = ["| condition | method | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for group in sorted(cols["ZS"], key=str):
        for method in METHODS:
            if method in cols["ZS"][group]:
                stats = [cols[c][group].get(method, (math.nan, math.nan, 0)) for c in cols]
                lines.append(f"| {condition(group)} | {method} | {cols['ZS'][group][method][2]} | "
                             + " | ".join(_cell_text(s) for s in stats) + " |")
        floor = [next(iter(chance[c].get(group, {}).values()), (math.nan, math.nan, 0)) for c in COLUMNS]
        lines.append(f"| {condition(group)} | *chance* | | " + " | ".join(_cell_text(s[:1] + (math.nan, s[2])) for s in floor)
                     + " |" * (len(cols) - len(COLUMNS)) + " |")
    return lines


# A difference of one or two evaluation images (0.2-0.7 points) can repeat at every seed, and a zero-width
# interval would then call it a gain: verdicts also need this many points.
MIN_EFFECT = 1.0


def is_verdict(stat: tuple) -> bool:
    """A paired gain `(mean, half_width, n)` whose CI excludes zero by at least `MIN_EFFECT` points
    (a NaN width, one seed, never passes)."""
    mean, half, _ = stat
    return abs(mean) > max(half, MIN_EFFECT)


def _gain_text(stat: tuple) -> str:
    """A paired gain's table cell, in bold when it is a verdict."""
    return f"**{_cell_text(stat, True)}**" if is_verdict(stat) else _cell_text(stat, True)


def gains_table(rows: list[dict], by: str = "method",
                columns: Sequence[str] = ("ZS", "R@1 i→t", "R@1 t→i", "linear probe")):
    """Markdown rows of paired gains (`paired_gains`) and the verdicts they support (CI excluding 0,
    effect of at least `MIN_EFFECT` points)."""
    gains = {c: paired_gains(rows, lambda r, c=c: metric(r, c), by) for c in columns}
    lines = [f"| condition | {by} | " + " | ".join(f"Δ {c}" for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    verdicts = []
    for group in sorted(gains[columns[0]], key=str):
        for arm in sorted(gains[columns[0]][group], key=lambda a: METHODS.index(a) if by == "method" else a):
            stats = [gains[c][group].get(arm, (math.nan, math.nan, 0)) for c in columns]
            label = f"{arm} ({CONTROLS[arm]})" if arm in CONTROLS else arm
            lines.append(f"| {condition(group)} | {label} | " + " | ".join(map(_gain_text, stats)) + " |")
            verdicts += [f"{label} {'helps' if m > 0 else 'hurts'} {c} at {condition(group)} ({m:+.1f} ± {h:.1f} points)"
                         for c, (m, h, n) in zip(columns, stats, strict=True) if is_verdict((m, h, n))]
    return lines, verdicts


def summary_table(rows: list[dict], column: str) -> list[str]:
    """Markdown rows: each method's paired gain over CLIP on `column` (rows) in every condition of the
    method comparisons (columns), verdicts in bold; the whole comparison at a glance."""
    gains = paired_gains(rows, lambda r: metric(r, column))
    sizes = [g[3] for g in gains]
    usual = max(set(sizes), key=sizes.count, default=None)  # the noise sweeps' size: those come first
    groups = sorted(gains, key=lambda g: (g[0], g[3] != usual, g[3] or 0, g[2] or 0))

    def short(group: tuple) -> str:
        dataset, _, noise, n_train, _ = group
        return f"{dataset} ν={noise:g}" + (f", n={n_train}" if len(set(sizes)) > 1 and n_train is not None else "")

    methods = [m for m in METHODS if any(m in gains[g] for g in groups)]
    lines = [f"| Δ {column} | " + " | ".join(short(g) for g in groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for m in methods:
        stats = [gains[g].get(m, (math.nan, math.nan, 0)) for g in groups]
        lines.append(f"| {m} | " + " | ".join(map(_gain_text, stats)) + " |")
    return lines


def make_figures(preset_name: str, rows: list[dict], figures: Path) -> dict[str, str]:
    """Draw the report's figures into `figures`; returns `{title: file name}` of those drawn."""
    noise_rows = [r for r in rows if "noise" in r["cell"]["experiments"]]  # the figures' sweep
    size_rows = [r for r in rows if "size" in r["cell"]["experiments"]]
    x_field = "n_train" if size_rows else "noise"
    figs = {
        "accuracy vs noise": plot_sweep(noise_rows, "noise", ("ZS", "R@1 i→t"),
                                        figures / f"{preset_name}_accuracy_vs_noise.png"),
        f"gain over CLIP vs {x_field}": plot_sweep(size_rows or noise_rows, x_field, ("ZS", "R@1 i→t"),
                                                   figures / f"{preset_name}_gain_vs_{x_field}.png", gains=True),
        "effective robustness": plot_robustness(noise_rows, figures / f"{preset_name}_effective_robustness.png"),
        "target quality over training": plot_target_quality(noise_rows, figures / f"{preset_name}_target_quality.png"),
    }
    return {title: name for title, name in figs.items() if name}


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


