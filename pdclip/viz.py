"""Plots for the notebooks: each function takes an optional matplotlib `ax` (or `axes`) and returns it.

Nothing here computes a metric; values come from `pdclip.metrics` / `pdclip.evaluate` or a run's
`metrics.jsonl`. Import-only: pyplot is imported inside the functions, so importing pdclip never
picks a matplotlib backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdclip.metrics import fit_trend, mean_ci, trend_accuracy


def _new_axes(ax, ncols: int = 1, width: float = 4.0, height: float = 3.6):
    """`ax` itself, or a fresh figure with `ncols` axes side by side."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained")
    return axes[0, 0] if ncols == 1 else axes[0]


def plot_effective_robustness(
    id_acc: Sequence[float],
    shift_acc: Sequence[float],
    names: Sequence[str],
    baselines: Sequence[str],
    ax=None,
    title: str = "Effective robustness",
    chance: float | None = None,
    groups: Sequence[str] | None = None,
):
    """Shifted vs in-distribution accuracy on logit axes, with the baselines' trend line (Taori et al.).

    Models above the line are more robust than the baselines at equal in-distribution accuracy.

    Args:
        id_acc, shift_acc: one accuracy in (0, 1) per model.
        names: one label per model.
        baselines: the names whose points fix the trend line (at least two distinct accuracies).
        ax: a matplotlib Axes to draw into, or None for a new figure.
        chance: the accuracy of guessing, on both axes; drawn as dashed lines when given.
        groups: one group per model (e.g. its method): points are coloured, and named once in the
            legend, by group instead of one colour and entry per model (many seeds stay readable).

    Returns:
        The Axes.
    """
    ax = _new_axes(ax, width=7.0, height=4.2)  # room for the legend beside the axes
    id_acc, shift_acc = np.asarray(id_acc, dtype=float), np.asarray(shift_acc, dtype=float)
    if not len(id_acc) == len(shift_acc) == len(names):
        raise ValueError("id_acc, shift_acc and names must have one entry per model")
    is_base = np.array([n in baselines for n in names])
    slope, intercept = fit_trend(id_acc[is_base], shift_acc[is_base])
    floor = min(id_acc.min(), shift_acc.min(), chance if chance is not None else 1.0)
    lo = max(floor * 0.7, 1e-3)
    hi = min(1 - (1 - max(id_acc.max(), shift_acc.max())) * 0.7, 1 - 1e-3)
    grid = 1 / (1 + np.exp(-np.linspace(np.log(lo / (1 - lo)), np.log(hi / (1 - hi)), 100)))
    ax.plot(grid, grid, ls=":", c="0.6", lw=1, label="y = x (no shift penalty)")
    ax.plot(grid, trend_accuracy(grid, slope, intercept), c="0.3", lw=1.5, label="baseline trend")
    if chance is not None:
        ax.axvline(chance, ls="--", c="0.5", lw=0.8, label=f"chance ({chance:.1%})")
        ax.axhline(chance, ls="--", c="0.5", lw=0.8)
    # One colour per model (or group), named once in the legend beside the plot: models a point apart
    # stay readable (text labels next to clumped points overlapped each other or the markers).
    labels = list(names) if groups is None else list(groups)
    colour = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(labels))}
    seen: set[str] = set()
    for x, y, label, base in zip(id_acc, shift_acc, labels, is_base, strict=True):
        label = f"{label} (baseline)" if base else label
        ax.scatter(x, y, color=colour[label.removesuffix(" (baseline)")], marker="s" if base else "o",
                   edgecolors="0.2", zorder=3, label=None if label in seen else label)
        seen.add(label)
    _percent_logit_axes(ax, lo, hi)
    ax.set_xlabel("in-distribution accuracy")
    ax.set_ylabel("shifted accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return ax


def _percent_logit_axes(ax, lo: float, hi: float) -> None:
    """Logit-scaled x and y from `lo` to `hi`, ticked at round percentages."""
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
             if lo <= t <= hi]
    for axis, scale, limits in ((ax.xaxis, ax.set_xscale, ax.set_xlim), (ax.yaxis, ax.set_yscale, ax.set_ylim)):
        scale("logit")
        limits(lo, hi)
        axis.set_ticks(ticks, [f"{t:.0%}" for t in ticks])
        axis.set_ticks([], minor=True)


def _as_array(matrix) -> np.ndarray:
    m = matrix.detach().float().cpu().numpy() if hasattr(matrix, "detach") else np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"plot_matrix needs a 2-D matrix, got shape {m.shape}")
    return m


def _norm(vmin: float | None, vmax: float | None, log: bool):
    """A linear or logarithmic colour scale from `vmin` to `vmax` (None: the data's range)."""
    from matplotlib.colors import LogNorm, Normalize

    if log and (vmin is None or vmin <= 0):
        raise ValueError("a log colour scale needs vmin > 0 (values below it are drawn at vmin)")
    return LogNorm(vmin, vmax, clip=True) if log else Normalize(vmin, vmax)


def plot_matrix(matrix, ax=None, title: str = "", cmap: str = "viridis", vmin: float | None = None,
                vmax: float | None = None, log: bool = False, colorbar: bool = True, label: str = ""):
    """A heatmap of a `(B, B)` matrix: rows are images, columns captions.

    Args:
        matrix: a tensor or array, e.g. logits, targets or the true correspondence.
        ax: a matplotlib Axes, or None for a new figure.
        vmin, vmax: the colour scale's ends (None: the matrix's own range). Give the same values to
            matrices that are compared, or use `plot_matrices`, which does it for you.
        log: a logarithmic colour scale (needs `vmin > 0`): small target mass stays visible.
        colorbar: draw a colour bar beside the axes, titled `label`.

    Returns:
        The Axes.
    """
    ax = _new_axes(ax)
    m = _as_array(matrix)
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(m, cmap=cmap, norm=_norm(vmin, vmax, log), interpolation="nearest")
    for axis in (ax.xaxis, ax.yaxis):  # rows and columns are batch positions: integer ticks only
        axis.set_major_locator(MaxNLocator(integer=True))
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_title(title)
    ax.set_xlabel("caption j")
    ax.set_ylabel("image i")
    return ax


def plot_matrices(matrices: dict, axes=None, cmap: str = "viridis", vmin: float | None = None,
                  vmax: float | None = None, log: bool = False, shared_scale: bool = True, label: str = ""):
    """Several `(B, B)` matrices side by side, e.g. `{"logits": ..., "targets": ..., "truth": ...}`.

    By default they share one colour scale (from the smallest to the largest value of all of them,
    unless `vmin`/`vmax` say otherwise) and one colour bar, so equal colours mean equal values.

    Args:
        matrices: title -> matrix.
        axes: a sequence of as many Axes, or None for a new figure.
        vmin, vmax: the shared scale's ends (None: the range of all matrices).
        log: a logarithmic colour scale (needs `vmin > 0`).
        shared_scale: False gives each matrix its own scale and colour bar (e.g. logits beside targets).
        label: the colour bar's title.

    Returns:
        The Axes, one per matrix.
    """
    axes = _new_axes(axes, ncols=len(matrices), width=3.4, height=3.2)
    axes = np.atleast_1d(axes)
    if len(axes) != len(matrices):
        raise ValueError(f"got {len(axes)} axes for {len(matrices)} matrices")
    arrays = {title: _as_array(m) for title, m in matrices.items()}
    if shared_scale:
        vmin = min(a.min() for a in arrays.values()) if vmin is None else vmin
        vmax = max(a.max() for a in arrays.values()) if vmax is None else vmax
    for ax, (title, m) in zip(axes, arrays.items(), strict=True):
        plot_matrix(m, ax=ax, title=title, cmap=cmap, vmin=vmin, vmax=vmax, log=log,
                    colorbar=not shared_scale, label=label)
    if shared_scale:
        axes[0].figure.colorbar(axes[-1].images[-1], ax=list(axes), fraction=0.046 / len(axes) ** 0.5,
                                pad=0.02, label=label)
    return axes


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (e.g. a run's `metrics.jsonl`), skipping blank lines."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start), same length as `values`."""
    if window < 1:
        raise ValueError(f"smooth window must be >= 1, got {window}")
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(len(values)) + 1 - counts]) / counts


def plot_training_curves(
    records: str | Path | list[dict],
    keys: Sequence[str] = ("loss",),
    x: str = "step",
    ax=None,
    title: str = "",
    logy: bool = False,
    smooth: int = 1,
    ylabel: str | None = None,
    label: str | None = None,
    legend: bool = True,
):
    """Curves of logged values against `x`; records missing a key are skipped for that curve.

    Args:
        records: a `metrics.jsonl` path or its records (dicts with `x` and some of `keys`).
        keys: the logged values to draw.
        ax: a matplotlib Axes, or None for a new figure.
        smooth: a trailing moving average over this many records (per-step losses are noisy).
        ylabel: the y axis' label; None names the one key drawn (and the smoothing), or "value".
        label: the legend's name for the curve of a single key (e.g. the run's), instead of the key;
            several runs drawn into one `ax` then share one axis and one legend.
        legend: draw the legend (off for all but the last of several calls on one `ax`, if wanted).

    Returns:
        The Axes.
    """
    records = read_jsonl(records) if isinstance(records, str | Path) else records
    ax = _new_axes(ax, width=5.0)
    drawn = 0
    for key in keys:
        points = [(r[x], r[key]) for r in records if x in r and isinstance(r.get(key), int | float)]
        if points:
            xs, ys = np.array(points, dtype=float).T
            ax.plot(xs, moving_average(ys, smooth), label=label if label is not None and len(keys) == 1 else key)
            drawn += 1
    if not drawn:
        raise ValueError(f"no record has {x!r} and any of {list(keys)}")
    from matplotlib.ticker import MaxNLocator

    if logy:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    if ylabel is None:
        ylabel = (keys[0] if len(keys) == 1 else "value") + (f" (mean of {smooth})" if smooth > 1 else "")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    return ax


def plot_seed_curves(curves: dict[str, list[list[dict]]], key: str, ax=None, chance: float | None = None,
                     title: str = "", ylabel: str | None = None, logx: bool = True):
    """A metric against steps, one line per name: the mean over its seeds, a band from the lowest to
    the highest seed, and `chance` as a dotted line.

    Args:
        curves: `{name: [curve of each seed]}`, a curve being `[{"step": s, key: value, ...}]`
            (`pdclip.selection.KeepBest.curve`), every seed evaluated at the same steps.
    """
    ax = _new_axes(ax, width=5.0)
    for i, (name, runs) in enumerate(curves.items()):
        steps = [c["step"] for c in runs[0]]
        values = np.array([[c[key] for c in run] for run in runs], dtype=float)  # (seeds, steps)
        ax.plot(steps, values.mean(axis=0), color=f"C{i}", label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=f"C{i}", alpha=0.2, lw=0)
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label=f"chance {chance:.3f}")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel="step" + (" (log scale)" if logx else ""), ylabel=ylabel or key, title=title)
    ax.legend(fontsize=7)
    return ax


def plot_seed_intervals(values: dict[str, Sequence[float]], ax=None, chance: float | None = None,
                        title: str = "", ylabel: str = "", confidence: float = 0.95):
    """Each name's seeds as dots and their mean with a two-sided t-interval, beside `chance`."""
    ax = _new_axes(ax, width=5.0)
    for i, v in enumerate(values.values()):
        mean, half, _ = mean_ci(v, confidence)
        ax.errorbar(i, mean, yerr=np.nan_to_num(half), fmt="s", color=f"C{i}", capsize=4, ms=6)
        ax.scatter(np.full(len(v), i + 0.15), v, color=f"C{i}", s=12, alpha=0.6)
    if chance is not None:  # labelled on the line, not in a legend that could hide a point near it
        ax.axhline(chance, color="k", ls=":", lw=1)
        ax.annotate(f"chance {chance:.3f}", (-0.45, chance), xytext=(0, 2), textcoords="offset points", fontsize=8)
    ax.set_xticks(range(len(values)), list(values), rotation=20, fontsize=8)
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set(title=title, ylabel=ylabel)
    return ax
