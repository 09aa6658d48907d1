"""The study's markdown tables: what each column reads from a result row (at which training budget),
mean ± 95 % CI over seeds, paired gains over a baseline with intervals that resample test images and
seeds (`pdclip.study.bootstrap`), and the verdicts those support after Holm's correction."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import numpy as np

from pdclip.config import METHODS
from pdclip.study import bootstrap
from pdclip.study.presets import CONTROLS, headline
from pdclip.study.results import scores
from pdclip.study.stats import aggregate, arm_of, group_key, paired_gains, run_effective_robustness

COLUMNS = {  # table column -> metric key ("{h}" = the dataset's headline zero-shot score, `headline`)
    "val ZS": "val/{h}", "val R@1 i→t": "val/retrieval/i2t_R@1", "ZS": "test/{h}", "ZS hit@1": "test/{hit}",
    "R@1 i→t": "test/retrieval/i2t_R@1", "R@1 t→i": "test/retrieval/t2i_R@1", "linear probe": "linear_probe/acc",
}
ZS_NOTE = ("ZS: zero-shot top-1 on the synthetic source's 48 colour×shape classes; on clip art, whose 16 "
           "classes are unbalanced, balanced accuracy (mean per-class recall)")
# Budgets: "selected" reads each column at the run's step chosen on validation for it (zero-shot
# columns at the best val zero-shot, retrieval at the best val R@1, the probe at the zero-shot step or
# the last, whichever its val accuracy prefers; `pdclip.study.runner`); "final" reads the last step.
BUDGET_OF = {"val ZS": "zeroshot", "ZS": "zeroshot", "ZS hit@1": "zeroshot", "val R@1 i→t": "retrieval",
             "R@1 i→t": "retrieval", "R@1 t→i": "retrieval"}
ALPHA = 0.05  # family-wise error rate of the Holm-corrected verdicts
# A difference of one or two evaluation images (0.1-0.3 points) is no finding even when significant:
# verdicts also need this many points.
MIN_EFFECT = 1.0


def budget_of(row: dict, column: str, budget: str = "selected") -> str:
    """The name of the evaluation (`row["budgets"]`) a column is read from."""
    name = "final" if budget == "final" else BUDGET_OF.get(column, row["probe_budget"])
    return name if name in row["budgets"] else "final"  # runs without selection have only their last step


def metric(row: dict, column: str, prefix: str = "", budget: str = "selected") -> float | None:
    """A `COLUMNS` entry of a result row, in percent (None when the dataset lacks it); with
    `prefix="chance/"` its chance level (`pdclip.evaluate.evaluate_model`)."""
    h = headline(row["cell"]["dataset"])
    hit = h.replace("top1", "hit@1") if h.endswith("top1") else "none"
    value = scores(row, budget_of(row, column, budget)).get(prefix + COLUMNS[column].format(h=h, hit=hit))
    return None if value is None else 100 * value


def outcome(row: dict, column: str, budget: str = "selected") -> bootstrap.Outcome | None:
    """The per-image test outcomes behind a column, in points (None: a column without them, e.g. val)."""
    samples = row["budgets"][budget_of(row, column, budget)].get("samples", {})
    test = samples.get("test")
    if column == "linear probe" and "linear_probe" in samples:
        probe = samples["linear_probe"]
        return bootstrap.outcome(100 * (np.asarray(probe["pred"]) == np.asarray(probe["label"])))
    if test is None:
        return None
    if column == "ZS":
        task = headline(row["cell"]["dataset"]).split("/")[1]
        pred, label = (np.asarray(test[f"zeroshot/{task}/{k}"]) for k in ("pred", "label"))
        balanced = COLUMNS[column].format(h=headline(row["cell"]["dataset"])).endswith("mean_per_class_recall")
        return bootstrap.outcome(100 * (pred == label), group=label if balanced else None)
    if column == "R@1 i→t":
        return bootstrap.outcome(100 * np.asarray(test["retrieval/i2t_hit@1"]))
    if column == "R@1 t→i":  # queries are captions: an image's share is its captions' hits over their count
        owner, n = np.asarray(test["retrieval/text_to_image"]), len(test["retrieval/i2t_hit@1"])
        hits = np.bincount(owner, weights=100 * np.asarray(test["retrieval/t2i_hit@1"]), minlength=n)
        return bootstrap.outcome(hits, den=np.bincount(owner, minlength=n))
    return None


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


def results_table(rows: list[dict], budget: str = "selected", references: dict | None = None) -> list[str]:
    """Markdown rows: mean ± 95 % CI over seeds of every column, one row per (condition, method), each
    condition's chance row and (`references`: `{(dataset, n_train): probe acc}`) the raw backbone's probe."""
    cols = {c: aggregate(rows, lambda r, c=c: metric(r, c, budget=budget)) for c in COLUMNS}
    er = run_effective_robustness(rows, budget=budget)
    cols["eff. robustness (mild shift)"] = aggregate(
        rows, lambda r: 100 * er[r["cell"]["id"]] if r["cell"]["id"] in er else None)
    cols["target precision"] = aggregate(rows, final_quality)
    # Chance depends on the noise: vague captions truly describe many images.
    cols["chance precision"] = aggregate(rows, lambda r: final_quality(r, "i2t/chance_offdiag_precision"))
    # A score means something only next to what a model that knows nothing gets (the same for every method).
    chance = {c: aggregate(rows, lambda r, c=c: metric(r, c, "chance/", budget)) for c in COLUMNS}
    blank = " |" * (len(cols) - len(COLUMNS))
    lines = ["| condition | method | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for group in sorted(cols["ZS"], key=str):
        for method in METHODS:
            if method in cols["ZS"][group]:
                stats = [cols[c][group].get(method, (math.nan, math.nan, 0)) for c in cols]
                lines.append(f"| {condition(group)} | {method} | {cols['ZS'][group][method][2]} | "
                             + " | ".join(_cell_text(s) for s in stats) + " |")
        floor = [next(iter(chance[c].get(group, {}).values()), (math.nan, math.nan, 0)) for c in COLUMNS]
        lines.append(f"| {condition(group)} | *chance* | | "
                     + " | ".join(_cell_text(s[:1] + (math.nan, s[2])) for s in floor) + blank + " |")
        raw = (references or {}).get((group[0], group[3]))
        if raw is not None:
            probe = ["–"] * len(COLUMNS)
            probe[list(COLUMNS).index("linear probe")] = f"{100 * raw:.1f}"
            lines.append(f"| {condition(group)} | *raw backbone features* | | " + " | ".join(probe) + blank + " |")
    return lines


def bootstrap_gains(rows: list[dict], column: str, by: str = "method", budget: str = "selected",
                    baseline: str | None = None) -> dict[tuple, dict[str, tuple]]:
    """`{group: {arm: (mean, low, high, p)}}`: each arm's gain over the baseline arm on `column`, paired
    by seed, with a bootstrap over seeds and test images (`bootstrap.paired_bootstrap`).

    Args:
        by: "method" (arms are methods, the baseline CLIP) or "variant" (arms are variants of one
            method, the baseline its default `{}`; groups then ignore the variant).
    """
    baseline = baseline or ("clip" if by == "method" else "{}")
    group = group_key if by == "method" else (lambda c: group_key({**c, "variant": {}}))
    runs: dict[tuple, dict[str, dict[int, bootstrap.Outcome]]] = {}
    for row in rows:
        out = outcome(row, column, budget)
        if out is not None:
            runs.setdefault(group(row["cell"]), {}).setdefault(arm_of(row["cell"], by), {})[row["cell"]["seed"]] = out
    gains: dict[tuple, dict[str, tuple]] = {}
    for g, arms in runs.items():
        for arm, by_seed in arms.items():
            seeds = sorted(set(by_seed) & set(arms.get(baseline, {})))
            if arm != baseline and seeds:
                gains.setdefault(g, {})[arm] = bootstrap.paired_bootstrap(
                    [by_seed[s] for s in seeds], [arms[baseline][s] for s in seeds])
    return gains


def with_holm(gains: dict[str, dict[tuple, dict[str, tuple]]]) -> dict[tuple, tuple]:
    """`{(column, group, arm): (mean, low, high, p, p_holm)}`: one family, every comparison of `gains`
    (`{column: bootstrap_gains(...)}`)."""
    flat = [((c, g, a), stat) for c, by_group in gains.items() for g, by_arm in by_group.items()
            for a, stat in by_arm.items()]
    adjusted = bootstrap.holm([stat[3] for _, stat in flat])
    return {key: (*stat, p) for (key, stat), p in zip(flat, adjusted, strict=True)}


def is_verdict(stat: tuple) -> bool:
    """A gain `(mean, low, high, p, p_holm)` whose Holm-adjusted p is below `ALPHA` and whose size is
    at least `MIN_EFFECT` points."""
    mean, _, _, _, p_holm = stat
    return p_holm < ALPHA and abs(mean) >= MIN_EFFECT


def _gain_text(stat: tuple | None) -> str:
    """A gain's table cell, `+1.2 [-0.3, +2.8]`, in bold when it is a verdict."""
    if stat is None:
        return "–"
    text = f"{stat[0]:+.1f} [{stat[1]:+.1f}, {stat[2]:+.1f}]"
    return f"**{text}**" if is_verdict(stat) else text


def _arm_order(by: str) -> Callable[[str], object]:
    return (lambda a: METHODS.index(a)) if by == "method" else (lambda a: a)


def gains_table(rows: list[dict], by: str = "method", columns: Sequence[str] = ("ZS", "R@1 i→t", "R@1 t→i", "linear probe"),
                budget: str = "selected", prefix: str = "") -> tuple[list[str], list[str], int]:
    """Markdown rows of paired gains with bootstrap intervals, the verdicts they support (Holm over
    every comparison of the table), and the number of comparisons; `prefix` goes before each arm's label."""
    family = with_holm({c: bootstrap_gains(rows, c, by, budget) for c in columns})
    groups = sorted({g for _, g, _ in family}, key=str)
    lines = [f"| condition | {by} | " + " | ".join(f"Δ {c}" for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    verdicts = []
    for group in groups:
        for arm in sorted({a for _, g, a in family if g == group}, key=_arm_order(by)):
            label = prefix + (f"{arm} ({CONTROLS[arm]})" if arm in CONTROLS else arm)
            stats = [family.get((c, group, arm)) for c in columns]
            lines.append(f"| {condition(group)} | {label} | " + " | ".join(map(_gain_text, stats)) + " |")
            verdicts += [f"{label} {'helps' if s[0] > 0 else 'hurts'} {c} at {condition(group)} "
                         f"({s[0]:+.1f} [{s[1]:+.1f}, {s[2]:+.1f}] points, Holm p = {s[4]:.3f})"
                         for c, s in zip(columns, stats, strict=True) if s is not None and is_verdict(s)]
    return lines, verdicts, len(family)


def val_gains_table(rows: list[dict], columns: Sequence[str] = ("val ZS", "val R@1 i→t")) -> list[str]:
    """An ablation's validation columns: paired gains over the default variant, mean ± 95 % t-CI over
    seeds (what an ablation chooses on; no per-image outcomes are kept for validation)."""
    gains = {c: paired_gains(rows, lambda r, c=c: metric(r, c), "variant") for c in columns}
    lines = ["| condition | variant | " + " | ".join(f"Δ {c}" for c in columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for group in sorted(gains[columns[0]], key=str):
        for arm in sorted(gains[columns[0]][group]):
            label = f"{arm} ({CONTROLS[arm]})" if arm in CONTROLS else arm
            cells = [_cell_text(gains[c].get(group, {}).get(arm, (math.nan, math.nan, 0)), True) for c in columns]
            lines.append(f"| {condition(group)} | {label} | " + " | ".join(cells) + " |")
    return lines


def summary_table(rows: list[dict], column: str, budget: str = "selected") -> tuple[list[str], int]:
    """Markdown rows: each method's paired gain over CLIP on `column` (rows) in every condition of the
    method comparisons (columns), verdicts in bold (Holm over the table); and the number of comparisons."""
    family = with_holm({column: bootstrap_gains(rows, column, budget=budget)})
    gains = {g: {} for _, g, _ in family}
    for (_, g, a), stat in family.items():
        gains[g][a] = stat
    sizes = [g[3] for g in gains]
    usual = max(set(sizes), key=sizes.count, default=None)  # the noise sweeps' size: those come first
    groups = sorted(gains, key=lambda g: (g[0], g[3] != usual, g[3] or 0, g[2] or 0))

    def short(group: tuple) -> str:
        dataset, _, noise, n_train, _ = group
        return f"{dataset} ν={noise:g}" + (f", n={n_train}" if len(set(sizes)) > 1 and n_train is not None else "")

    methods = [m for m in METHODS if any(m in gains[g] for g in groups)]
    lines = [f"| Δ {column} | " + " | ".join(short(g) for g in groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_gain_text(gains[g].get(m)) for g in groups) + " |")
    return lines, len(family)


def steps_table(rows: list[dict]) -> list[str]:
    """Markdown rows: the mean step each method's runs were read at (zero-shot / retrieval budget),
    per condition: how differently the methods converge."""
    steps = {b: aggregate(rows, lambda r, b=b: r["budgets"].get(b, {}).get("step")) for b in ("zeroshot", "retrieval")}
    groups = sorted(steps["zeroshot"], key=str)
    lines = ["| condition | " + " | ".join(m for m in METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
    for g in groups:
        cells = [" / ".join(f"{steps[b][g][m][0]:.0f}" if m in steps[b].get(g, {}) else "–" for b in steps)
                 for m in METHODS]
        lines.append(f"| {condition(g)} | " + " | ".join(cells) + " |")
    return lines


TRAIN_MARKS = (1 / 3, 2 / 3, 1.0)  # where in training `train_curve_table` reads a run's curve


def curve_at(curve: list[dict], key: str, fraction: float) -> float | None:
    """A `train_curve` value (`pdclip.study.runner.train_curve`) at the window nearest `fraction` of
    the run; None where the run logs no such value (CLIP has no soft targets)."""
    last = curve[-1]["step"]
    point = min(curve, key=lambda p: abs(p["step"] - fraction * last))
    return point.get(key)


def train_curve_table(rows: list[dict]) -> list[str]:
    """Markdown rows: the student's confidence on its own training pairs and its targets' off-diagonal
    mass, in percent (mean ± 95 % CI over seeds) a third, two thirds and all of the way through training,
    per condition and method: how far a self-teacher could disagree with the given caption."""
    rows = [r for r in rows if r.get("train_curve")]
    cols = {f"{label} @ {fraction:.0%}": aggregate(rows, lambda r, k=key, f=fraction: _percent(curve_at(r["train_curve"], k, f)))
            for key, label in (("train_confidence", "confidence"), ("target_offdiag", "off-diagonal mass"))
            for fraction in TRAIN_MARKS}
    first = next(iter(cols.values()))
    lines = ["| condition | method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for group in sorted(first, key=str):
        for method in sorted(first[group], key=METHODS.index):
            lines.append(f"| {condition(group)} | {method} | " + " | ".join(_cell_text(c[group][method]) for c in cols.values()) + " |")
    return lines


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value
