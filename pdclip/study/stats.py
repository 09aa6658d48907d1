"""The study's statistics over result rows: mean +- t-interval over seeds, per-method aggregates,
differences paired by seed, and each run's effective robustness."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import numpy as np

from pdclip.study.presets import HEADLINE


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean and the half-width of its two-sided t-distribution confidence interval.

    Returns:
        `(mean, half_width, n)`; the half-width is NaN for fewer than two finite values.
    """
    from scipy.stats import t

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = t.ppf(0.5 + confidence / 2, df=len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def group_key(cell: dict) -> tuple:
    """What identifies a cell up to its seed (and its method)."""
    return (cell["dataset"], cell["setting"], cell["noise"], cell["n_train"],
            json.dumps(cell["variant"], sort_keys=True))


def aggregate(rows: list[dict], value: Callable[[dict], float | None]) -> dict[tuple, dict[str, tuple]]:
    """`{group_key: {method: mean_ci over seeds of value(row)}}` for result rows."""
    groups: dict[tuple, dict[str, list]] = {}
    for row in rows:
        groups.setdefault(group_key(row["cell"]), {}).setdefault(row["cell"]["method"], []).append(value(row))
    return {g: {m: mean_ci(v) for m, v in by_method.items()} for g, by_method in groups.items()}


def _arm(cell: dict, by: str) -> str:
    """What a comparison varies: the method, or (ablations) the variant."""
    return cell["method"] if by == "method" else json.dumps(cell["variant"], sort_keys=True)


def paired_gains(rows: list[dict], value: Callable[[dict], float | None],
                 by: str = "method") -> dict[tuple, dict[str, tuple]]:
    """`{group_key: {arm: mean_ci over seeds of value(arm) - value(baseline arm)}}`, paired by seed.

    Runs with the same seed share their initialisation and batch order, so the paired difference
    removes most of the seed-to-seed variance of the comparison.

    Args:
        by: "method" (arms are methods, the baseline CLIP) or "variant" (arms are variants of
            one method, the baseline its default `{}`; groups then ignore the variant).
    """
    baseline = "clip" if by == "method" else "{}"
    group = group_key if by == "method" else (lambda c: group_key({**c, "variant": {}}))
    by_seed = {(group(r["cell"]), _arm(r["cell"], by), r["cell"]["seed"]): value(r) for r in rows}
    out: dict[tuple, dict[str, list]] = {}
    for (g, arm, seed), v in by_seed.items():
        base = by_seed.get((g, baseline, seed))
        if arm != baseline and base is not None and v is not None:
            out.setdefault(g, {}).setdefault(arm, []).append(v - base)
    return {g: {a: mean_ci(d) for a, d in by_arm.items()} for g, by_arm in out.items()}


def run_effective_robustness(rows: list[dict], key: str = HEADLINE, baseline: str = "clip") -> dict[str, float]:
    """Each run's effective robustness (shift vs test `key`) against the trend of the baseline runs.

    Returns:
        `{cell id: shifted accuracy minus the baseline trend's prediction}`; empty when the rows have
        no shift split or fewer than two distinct baseline accuracies.
    """
    from pdclip.evaluate import robustness_table

    rows = [r for r in rows if f"shift/{key}" in r["metrics"]]
    results = {r["cell"]["id"]: r["metrics"] for r in rows}
    baselines = [r["cell"]["id"] for r in rows if r["cell"]["method"] == baseline]
    if len({results[b][f"test/{key}"] for b in baselines}) < 2:
        return {}
    return robustness_table(results, baselines, key)
