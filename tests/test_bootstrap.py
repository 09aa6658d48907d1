"""The study's statistics over test images and seeds: scores from per-image outcomes, the paired
bootstrap, Holm's correction, and the outcomes a result row hands them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdclip import metrics
from pdclip.study import bootstrap, tables


def test_scores_from_outcomes_match_the_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=200)
    labels[:3] = 4  # an uneven class
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, size=200))
    right = (preds == labels).astype(float)
    assert bootstrap.score(bootstrap.outcome(right))[0] == pytest.approx(right.mean())
    balanced = metrics.mean_per_class_recall(torch.as_tensor(preds), torch.as_tensor(labels))
    assert bootstrap.score(bootstrap.outcome(right, group=labels))[0] == pytest.approx(balanced)
    # captions as queries: an image's hits over its caption count is the caption-level mean
    owner = rng.integers(0, 50, size=160)
    hits = rng.random(160) < 0.3
    per_image = bootstrap.outcome(np.bincount(owner, weights=hits, minlength=50), den=np.bincount(owner, minlength=50))
    assert bootstrap.score(per_image)[0] == pytest.approx(hits.mean())


def test_identical_arms_have_no_difference_and_a_shift_is_found():
    rng = np.random.default_rng(1)
    base = [bootstrap.outcome(rng.random(300) < 0.5) for _ in range(5)]
    mean, low, high, p = bootstrap.paired_bootstrap(base, base)
    assert (mean, low, high, p) == (0.0, 0.0, 0.0, 1.0)
    better = [bootstrap.outcome(np.maximum(o[0], rng.random(300) < 0.2)) for o in base]  # ~10 points more
    mean, low, high, p = bootstrap.paired_bootstrap(better, base)
    assert 0 < low < mean < high and p < 0.01


def test_the_interval_resamples_images_as_well_as_seeds():
    """Five seeds that agree exactly leave a seeds-only interval of zero width; the images a small test
    split happens to hold still make the difference uncertain, and the bootstrap says so."""
    rng = np.random.default_rng(2)
    a = rng.random(100) < 0.55
    b = rng.random(100) < 0.5
    mean, low, high, p = bootstrap.paired_bootstrap([bootstrap.outcome(a)] * 5, [bootstrap.outcome(b)] * 5)
    assert mean == pytest.approx(a.mean() - b.mean())
    assert high - low > 0.05  # a t-interval over the five identical seeds would be 0 wide
    # more test images, the same per-image rates: a narrower interval
    wide = high - low
    a2, b2 = np.tile(a, 16), np.tile(b, 16)
    _, low2, high2, _ = bootstrap.paired_bootstrap([bootstrap.outcome(a2)] * 5, [bootstrap.outcome(b2)] * 5)
    assert high2 - low2 < wide / 2


def test_the_bootstrap_refuses_unpaired_or_mismatched_outcomes():
    one = bootstrap.outcome([1, 0, 1])
    with pytest.raises(ValueError, match="one baseline outcome per arm"):
        bootstrap.paired_bootstrap([one, one], [one])
    with pytest.raises(ValueError, match="different numbers of test images"):
        bootstrap.paired_bootstrap([one], [bootstrap.outcome([1, 0])])


def test_holm_matches_the_step_down_by_hand():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, running max), 0.5 (x1 = 0.5)
    assert bootstrap.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert bootstrap.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8 x 2 capped at 1; 0.9 keeps the running max
    assert bootstrap.holm([0.01, 0.2]) == pytest.approx([0.02, 0.2])


def test_a_result_rows_outcomes_reproduce_its_scores():
    """What the tables bootstrap is what the run scored: each column's outcome at its budget."""
    labels = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    samples = {"test": {"zeroshot/category/pred": pred, "zeroshot/category/label": labels,
                        "retrieval/i2t_hit@1": [1, 0, 0, 1, 1], "retrieval/t2i_hit@1": [1, 1, 0, 0, 0, 1],
                        "retrieval/text_to_image": [0, 0, 1, 2, 3, 4]},
               "linear_probe": {"pred": [0, 0, 1, 2, 2], "label": labels}}
    row = {"cell": {"dataset": "clipart"}, "probe_budget": "final",
           "budgets": {"final": {"samples": {}}, "zeroshot": {"samples": samples}, "retrieval": {"samples": samples}}}
    score = {c: bootstrap.score(tables.outcome(row, c))[0] for c in ("ZS", "R@1 i→t", "R@1 t→i")}
    assert score["ZS"] == pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)  # balanced: per-class recalls 1/2, 1, 0
    assert score["R@1 i→t"] == pytest.approx(60.0) and score["R@1 t→i"] == pytest.approx(50.0)
    assert tables.outcome(row, "linear probe") is None  # the probe was read at "final", which kept none
    row["probe_budget"] = "zeroshot"
    assert bootstrap.score(tables.outcome(row, "linear probe"))[0] == pytest.approx(80.0)
    assert tables.outcome(row, "val ZS") is None and tables.outcome(row, "ZS", budget="final") is None
