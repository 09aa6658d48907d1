"""The study's statistics over result rows: mean +- t-interval over seeds, per-method aggregates,
differences paired by seed, and each run's effective robustness."""

from __future__ import annotations

import json
from collections.abc import Callable

from pdclip.metrics import mean_ci
from pdclip.study.presets import HEADLINE
from pdclip.study.results import scores


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


def arm_of(cell: dict, by: str) -> str:
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
    by_seed = {(group(r["cell"]), arm_of(r["cell"], by), r["cell"]["seed"]): value(r) for r in rows}
    out: dict[tuple, dict[str, list]] = {}
    for (g, arm, seed), v in by_seed.items():
        base = by_seed.get((g, baseline, seed))
        if arm != baseline and base is not None and v is not None:
            out.setdefault(g, {}).setdefault(arm, []).append(v - base)
    return {g: {a: mean_ci(d) for a, d in by_arm.items()} for g, by_arm in out.items()}


def run_effective_robustness(rows: list[dict], key: str = HEADLINE, baseline: str = "clip", budget: str = "selected",
                             shift: str = "shift_mild") -> dict[str, float]:
    """Each run's effective robustness (`shift` vs test `key`) against the trend of the baseline runs,
    at the zero-shot budget ("selected") or the last step ("final").

    Returns:
        `{cell id: shifted accuracy minus the baseline trend's prediction}`; empty when the rows have
        no such shift split or fewer than two distinct baseline accuracies.
    """
    from pdclip.evaluate import robustness_table

    name = "final" if budget == "final" else "zeroshot"
    results = {r["cell"]["id"]: scores(r, name) for r in rows if f"{shift}/{key}" in scores(r, name)}
    baselines = [r["cell"]["id"] for r in rows if r["cell"]["method"] == baseline and r["cell"]["id"] in results]
    if len({results[b][f"test/{key}"] for b in baselines}) < 2:
        return {}
    return robustness_table(results, baselines, key, shift_split=shift)
