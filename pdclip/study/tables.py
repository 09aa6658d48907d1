"""The study's markdown tables: what each column reads from a result row, mean +- 95 % CI over seeds,
paired gains over a baseline, and the verdicts those support (a difference is called a gain or a loss
only when its interval excludes zero)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from pdclip.config import METHODS
from pdclip.study.presets import CONTROLS, headline
from pdclip.study.stats import aggregate, paired_gains, run_effective_robustness

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
