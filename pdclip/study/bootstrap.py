"""Intervals that resample test images as well as seeds, and Holm's correction for many comparisons.

A run's test score is a mean over the split's images (balanced accuracy: a mean over classes of
per-class means), so it carries two kinds of luck: the training seed, and which images the split
happens to hold. A t-interval over seeds sees only the first; with a few hundred test images and
small classes the second can be as large. `paired_bootstrap` resamples both: each replicate draws
the seeds with replacement and one multinomial reweighting of the test images, shared by both arms
and every seed (the arms were scored on the same images), and recomputes the mean paired difference.

An outcome is `(num, den, group)`, three `(N,)` arrays over test images: the score is the mean over
groups of `sum(num) / sum(den)` within the group (`den` > 0). Top-1 and R@1: `num` the hits, `den`
ones, one group; balanced accuracy: one group per class; text→image R@1, whose queries are captions:
`num` an image's caption hits, `den` its caption count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Outcome = tuple[np.ndarray, np.ndarray, np.ndarray]
N_BOOT = 4000  # p-values resolve to 1 / 4000, below Holm's smallest threshold for ~40 comparisons (0.05 / 40)


def outcome(hits: Sequence[int], den: Sequence[int] | None = None, group: Sequence[int] | None = None) -> Outcome:
    """An outcome from per-image hits (and per-image denominators and groups; default ones and one group)."""
    num = np.asarray(hits, dtype=float)
    return (num, np.ones_like(num) if den is None else np.asarray(den, dtype=float),
            np.zeros(len(num), dtype=int) if group is None else np.asarray(group, dtype=int))


def score(out: Outcome, weights: np.ndarray | None = None) -> np.ndarray:
    """The score under image weights `(R, N)` (None: the observed score, once): `(R,)` (or `(1,)`)."""
    num, den, group = out
    w = np.ones((1, len(num))) if weights is None else weights
    onehot = np.eye(group.max() + 1)[group]  # (N, G)
    n, d = (w * num) @ onehot, (w * den) @ onehot
    valid = d > 0  # a class the replicate drew no image of drops out, as it would from a smaller split
    return np.where(valid, n / np.where(valid, d, 1.0), 0.0).sum(axis=1) / valid.sum(axis=1)


def paired_bootstrap(arm: Sequence[Outcome], baseline: Sequence[Outcome] | None = None, n_boot: int = N_BOOT,
                     seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean over seeds of `score(arm) - score(baseline)` (or of `score(arm)`), with its bootstrap interval.

    Args:
        arm, baseline: one outcome per seed, in the same seed order (`baseline[s]` pairs with `arm[s]`);
            every outcome covers the same test images.
        n_boot: replicates; seed: the resampling's seed (the report is reproducible).

    Returns:
        `(mean, low, high, p)`: the observed mean, the percentile interval, and the two-sided p-value
        of "no difference" (the share of replicates on the far side of zero, doubled; at least
        `1 / (n_boot + 1)`). In points when the outcomes are fractions times 100.
    """
    if not arm or (baseline is not None and len(baseline) != len(arm)):
        raise ValueError(f"need one baseline outcome per arm outcome, got {len(arm)} and "
                         f"{None if baseline is None else len(baseline)}")
    sizes = {len(o[0]) for o in [*arm, *(baseline or [])]}
    if len(sizes) != 1:
        raise ValueError(f"outcomes cover different numbers of test images: {sorted(sizes)}")
    n, seeds = sizes.pop(), len(arm)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)  # (R, N) image counts
    draws = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=n_boot) / seeds  # (R, S) seed shares

    def per_seed(w: np.ndarray | None) -> np.ndarray:  # (R, S) the arm's score minus the baseline's
        a = np.stack([score(o, w) for o in arm], axis=1)
        return a if baseline is None else a - np.stack([score(o, w) for o in baseline], axis=1)

    observed = float(per_seed(None).mean())
    boot = (per_seed(weights) * draws).sum(axis=1)
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    far = min((boot <= 0).sum(), (boot >= 0).sum())
    p = min(1.0, 2 * (far + 1) / (n_boot + 1))
    return observed, float(low), float(high), p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: adjusted p-values in the input order (family-wise error control
    over all of them, without assuming the tests are independent)."""
    m = len(pvalues)
    order = np.argsort(pvalues)
    adjusted, running = np.empty(m), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()
