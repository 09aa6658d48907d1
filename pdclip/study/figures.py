"""The study's figures: accuracy and gains against noise or size, validation scores against steps,
effective robustness, and the soft targets' quality over training, drawn from result rows
(matplotlib is imported only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdclip.config import METHODS
from pdclip.study.presets import HEADLINE, headline
from pdclip.study.results import scores
from pdclip.study.stats import aggregate, paired_gains
from pdclip.study.tables import metric


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


def plot_robustness(rows: list[dict], path: Path, shift: str = "shift_mild") -> str | None:
    """Shifted vs test headline accuracy at the zero-shot budget: every CLIP run (squares in CLIP's
    colour, they fix the trend, as in the tables) and one point per other (method, noise), averaged
    over seeds, coloured by method; the dashed lines are chance."""
    from pdclip.viz import plot_effective_robustness

    rows = [r for r in rows if f"{shift}/{HEADLINE}" in scores(r)]
    acc = lambda r: (scores(r)[f"test/{HEADLINE}"], scores(r)[f"{shift}/{HEADLINE}"])  # noqa: E731
    base = np.array([acc(r) for r in rows if r["cell"]["method"] == "clip"])
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["cell"]["method"] != "clip":
            groups.setdefault((r["cell"]["method"], r["cell"]["noise"]), []).append(acc(r))
    if len({a for a, _ in base}) < 2 or not groups:
        return None
    chance = float(np.mean([scores(r)[f"chance/{shift}/{HEADLINE}"] for r in rows]))
    # 20 (method, noise) points crowd each other: colour says the method, no text labels.
    ax = plot_effective_robustness(base[:, 0], base[:, 1], ["clip"] * len(base), ["clip"], chance=chance,
                                   title=f"Effective robustness, {shift.replace('_', ' ')} (colour+shape top-1)")
    for i, method in enumerate(METHODS):
        points = np.array([np.mean(v, axis=0) for (m, _), v in groups.items() if m == method])
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], color=f"C{i}", zorder=4, label=f"{method} (one ν each)")
    for text in list(ax.texts):  # the baselines' "clip" labels
        text.remove()
    handles = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True) if lab != "models"]
    ax.legend(*zip(*handles, strict=True), fontsize=7, loc="upper left")  # "models": the empty non-baselines
    return _save(ax.figure, path)


def plot_curves(rows: list[dict], path: Path) -> str | None:
    """Validation zero-shot and R@1 against steps, per method the mean over seeds and the seeds' range,
    one column per (dataset, noise level): where each method peaks, and how fast it declines after."""
    import matplotlib.pyplot as plt

    from pdclip.viz import plot_seed_curves

    rows = [r for r in rows if r.get("curve") and not r["cell"]["variant"]]
    datasets = sorted({r["cell"]["dataset"] for r in rows})
    if not rows:
        return None
    # Each dataset's own noise levels, left to right (two sources need not share them).
    noises = {d: sorted({r["cell"]["noise"] for r in rows if r["cell"]["dataset"] == d}) for d in datasets}
    width = max(map(len, noises.values()))
    fig, axes = plt.subplots(2 * len(datasets), width, figsize=(3.4 * width, 2.8 * 2 * len(datasets)),
                             layout="constrained", squeeze=False)
    for d, dataset in enumerate(datasets):
        chance = next(r["budgets"]["final"]["metrics"] for r in rows if r["cell"]["dataset"] == dataset)
        for col in range(width):
            noise = noises[dataset][col] if col < len(noises[dataset]) else object()  # past its levels: empty
            curves = {m: [r["curve"] for r in rows if (r["cell"]["dataset"], r["cell"]["noise"], r["cell"]["method"])
                          == (dataset, noise, m)] for m in METHODS}
            curves = {m: c for m, c in curves.items() if c}
            for k, (key, label) in enumerate(((f"val/{headline(dataset)}", "val ZS"),
                                              ("val/retrieval/i2t_R@1", "val R@1 i→t"))):
                ax = axes[2 * d + k, col]
                if not curves:
                    ax.set_axis_off()
                    continue
                plot_seed_curves(curves, key, ax, chance=chance.get(f"chance/{key}"),
                                 title=f"{dataset}, ν = {noise:g}", ylabel=label)
                if (d, k, col) != (0, 0, 0):
                    ax.get_legend().remove()
    return _save(fig, path)


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


def plot_train_curves(rows: list[dict], path: Path) -> str | None:
    """Confidence on the training pairs and the targets' off-diagonal mass against steps, mean over
    seeds, one line per method and variant, one row of panels per (dataset, noise level)."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("train_curve")]
    conditions = sorted({(r["cell"]["dataset"], r["cell"]["noise"]) for r in rows}, key=str)
    if not rows:
        return None
    fig, axes = plt.subplots(len(conditions), 2, figsize=(9, 3.2 * len(conditions)), layout="constrained", squeeze=False)
    for (dataset, noise), panels in zip(conditions, axes, strict=True):
        runs: dict[str, list] = {}
        for r in rows:
            if (r["cell"]["dataset"], r["cell"]["noise"]) == (dataset, noise):
                label = r["cell"]["method"] + "".join(f", {k.removeprefix('psd_')}={v}" for k, v in sorted(r["cell"]["variant"].items()))
                runs.setdefault(label, []).append(r["train_curve"])
        for ax, key, ylabel in zip(panels, ("train_confidence", "target_offdiag"),
                                   ("confidence on its training pairs", "targets' off-diagonal mass"), strict=True):
            for i, (label, curves) in enumerate(sorted(runs.items())):
                if key in curves[0][0]:
                    ax.plot([p["step"] for p in curves[0]], np.mean([[p[key] for p in c] for c in curves], axis=0),
                            label=label, color=f"C{i}")
            ax.set(xlabel="step", ylabel=ylabel, ylim=(0, 1), title=f"{dataset}, ν = {noise:g}")
        panels[0].legend(fontsize=6)
    return _save(fig, path)


def make_figures(preset_name: str, rows: list[dict], figures: Path) -> dict[str, str]:
    """Draw the report's figures into `figures`; returns `{title: file name}` of those drawn."""
    noise_rows = [r for r in rows if "noise" in r["cell"]["experiments"]]  # the figures' sweep
    size_rows = [r for r in rows if "size" in r["cell"]["experiments"]]
    if len({r["cell"]["n_train"] for r in size_rows}) < 2:  # the sweep's other sizes not run yet
        size_rows = []
    x_field = "n_train" if size_rows else "noise"
    figs = {
        "accuracy vs noise": noise_rows and plot_sweep(noise_rows, "noise", ("ZS", "R@1 i→t"),
                                                       figures / f"{preset_name}_accuracy_vs_noise.png"),
        f"gain over CLIP vs {x_field}": noise_rows and plot_sweep(
            size_rows or noise_rows, x_field, ("ZS", "R@1 i→t"), figures / f"{preset_name}_gain_vs_{x_field}.png",
            gains=True),
        "validation scores against steps": plot_curves(
            [r for r in rows if {"noise", "clipart_noise"} & set(r["cell"]["experiments"])] or rows,
            figures / f"{preset_name}_curves.png"),
        "effective robustness, mild shift": plot_robustness(noise_rows, figures / f"{preset_name}_effective_robustness.png"),
        "target quality over training": plot_target_quality(noise_rows, figures / f"{preset_name}_target_quality.png"),
        "confidence and target mass over training": plot_train_curves(rows, figures / f"{preset_name}_train_curves.png"),
    }
    return {title: name for title, name in figs.items() if name}
