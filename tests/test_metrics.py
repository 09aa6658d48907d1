"""pdclip.metrics: agreement with CLIP_benchmark 1.6.2 on the same features, and hand-made cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb_zs
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from sklearn.metrics import balanced_accuracy_score

from pdclip import metrics


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


class LookupTextModel:
    """A text 'encoder' that looks each prompt up in a random table, for CLIP_benchmark's classifier."""

    def __init__(self, prompts: list[str], dim: int = 16):
        self.vocab = {p: i for i, p in enumerate(prompts)}
        self.table = torch.randn(len(prompts), dim, generator=torch.Generator().manual_seed(1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab[t] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


# ---------------------------------------------------------------- agreement with CLIP_benchmark


def test_class_embeddings_match_clip_benchmark_prompt_ensemble():
    classnames, templates = [f"class{c}" for c in range(7)], ["a photo of a {}.", "a drawing of a {}.", "{}"]
    model = LookupTextModel([t.format(c) for c in classnames for t in templates])
    ours = metrics.class_embeddings(lambda texts: model.encode_text(model.tokenize(texts)), classnames, templates,
                                    chunk=4)
    cb_templates = [t.replace("{}", "{c}") for t in templates]
    theirs = cb_zs.zero_shot_classifier(model, model.tokenize, classnames, cb_templates, "cpu", amp=False)
    torch.testing.assert_close(ours, theirs.T)


@pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")  # inside clip_benchmark
@pytest.mark.parametrize("n_classes", [3, 10])
def test_zeroshot_matches_clip_benchmark(n_classes):
    images, classifier = unit(300, 16, seed=2), unit(n_classes, 16, seed=3)
    labels = torch.randint(0, n_classes, (300,), generator=torch.Generator().manual_seed(4))
    ours = metrics.zeroshot_metrics(images, classifier, labels)
    logits = 100.0 * images @ classifier.T  # CLIP_benchmark's run_classification
    assert ours["top1"] == pytest.approx(cb_zs.accuracy(logits, labels, topk=(1,))[0])
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))
    if n_classes >= 5:
        assert ours["top5"] == pytest.approx(cb_zs.accuracy(logits, labels, topk=(5,))[0])
    else:
        assert "top5" not in ours  # CLIP_benchmark reports NaN; we leave it out
    assert 0.0 < ours["top1"] < 1.0


def test_retrieval_matches_clip_benchmark_with_several_captions_per_image():
    n_img, per = 40, 3
    images = unit(n_img, 8, seed=5)
    text_to_image = torch.arange(n_img).repeat_interleave(per)
    texts = F.normalize(images[text_to_image] + 1.5 * unit(n_img * per, 8, seed=6), dim=-1)
    ours = metrics.retrieval_metrics(images, texts, text_to_image, chunk=7)
    scores = texts @ images.T  # as in clip_benchmark.metrics.zeroshot_retrieval.evaluate
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    for k in (1, 5, 10):
        t2i = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        i2t = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(t2i)  # CLIP_benchmark's image_retrieval_recall@k
        assert ours[f"i2t_R@{k}"] == pytest.approx(i2t)  # CLIP_benchmark's text_retrieval_recall@k
    assert 0.0 < ours["t2i_R@1"] < ours["t2i_R@10"] < 1.0


# ---------------------------------------------------------------- hand-made features, known answers


def test_zeroshot_hand_made():
    classifier = torch.eye(3)
    images = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0.6, 0.8]])
    labels = torch.tensor([0, 0, 0, 1])  # the last image scores class 2 first, class 1 second
    out = metrics.zeroshot_metrics(images, classifier, labels, multilabels=[{0}, {0}, {1}, {1, 2}])
    assert out["top1"] == pytest.approx(0.75)
    assert out["mean_per_class_recall"] == pytest.approx(0.5)  # class 0: 3/3, class 1: 0/1
    assert out["hit@1"] == pytest.approx(0.75)  # image 2 has label {1} but predicts 0
    assert "hit@5" not in out and "top5" not in out  # only 3 classes


def test_hit_at_k_counts_any_label_in_top_k():
    logits = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.2, 0.9]])
    assert metrics.hit_at_k(logits, [{1, 2}, {0}], 1) == 0.0
    assert metrics.hit_at_k(logits, [{1, 2}, {0}], 2) == 0.5
    assert metrics.hit_at_k(logits, [{1, 2}, {0}], 4) == 1.0


def test_retrieval_hand_made():
    images = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.6, 0.8]])
    texts = torch.tensor([[0.8, 0.6, 0], [1, 0, 0], [0, 1, 0], [0.8, 0, 0.6]])
    text_to_image = torch.tensor([0, 0, 1, 2])  # image 0 has two captions; caption 3 looks like image 0
    out = metrics.retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5))
    assert out["t2i_R@1"] == pytest.approx(3 / 4)  # only caption 3 retrieves the wrong image
    assert out["i2t_R@1"] == pytest.approx(2 / 3)  # image 2's best caption (0.6) is image 1's
    assert out["i2t_R@2"] == 1.0  # ... its own caption (0.48) comes second
    assert "i2t_R@5" not in out and "t2i_R@5" not in out  # larger than the galleries


def test_retrieval_rejects_bad_text_to_image():
    with pytest.raises(ValueError, match="text_to_image"):
        metrics.retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


def test_linear_probe_separable_and_random_labels():
    gen = torch.Generator().manual_seed(7)
    centers = unit(4, 16, seed=8) * 3
    labels = torch.randint(0, 4, (600,), generator=gen)
    feats = centers[labels] + 0.3 * torch.randn(600, 16, generator=gen)
    splits = [(feats[s], labels[s]) for s in (slice(0, 300), slice(300, 400), slice(400, 600))]
    out = metrics.linear_probe(*splits)
    assert out["acc"] > 0.98 and out["C"] in (0.1, 1.0, 10.0, 100.0)
    noise = [(unit(len(y), 16, seed=i), y) for i, (_, y) in enumerate(splits)]
    assert abs(metrics.linear_probe(*noise)["acc"] - 0.25) < 0.12


def test_effective_robustness_residuals():
    base_id = np.array([0.2, 0.4, 0.6, 0.8])
    base_shift = metrics.trend_accuracy(base_id, slope=0.8, intercept=-0.5)  # baselines on one line
    slope, intercept = metrics.fit_trend(base_id, base_shift)
    assert (slope, intercept) == pytest.approx((0.8, -0.5))
    er = metrics.effective_robustness([0.5, 0.5], [base_shift.mean() + 0.1, 0.1], base_id, base_shift)
    expected = np.array([base_shift.mean() + 0.1, 0.1]) - metrics.trend_accuracy([0.5], 0.8, -0.5)
    np.testing.assert_allclose(er, expected)
    assert er[0] > 0 > er[1]
    with pytest.raises(ValueError, match="two distinct"):
        metrics.fit_trend([0.5, 0.5], [0.3, 0.4])


def test_target_quality_identity_is_hard_baseline_and_uniform_is_chance():
    truth = torch.rand(8, 8, generator=torch.Generator().manual_seed(9)) < 0.3
    truth[0, 0] = False  # a noisy caption: the diagonal need not be a true match
    identity = metrics.target_quality(torch.eye(8), truth)
    assert identity["true_mass"] == pytest.approx(identity["hard_true_mass"])
    assert identity["offdiag_mass"] == 0.0 and "offdiag_precision" not in identity
    uniform = metrics.target_quality(torch.full((8, 8), 1 / 8), truth)
    assert uniform["true_mass"] == pytest.approx(uniform["chance_true_mass"])
    assert uniform["offdiag_precision"] == pytest.approx(uniform["chance_offdiag_precision"])


def test_target_quality_oracle_off_diagonal_mass():
    truth = torch.eye(4, dtype=torch.bool)
    truth[0, 1] = truth[1, 0] = True  # captions 0 and 1 describe both images 0 and 1
    oracle = truth.double() / truth.sum(1, keepdim=True)
    out = metrics.target_quality(oracle, truth)
    assert out["true_mass"] == 1.0 and out["offdiag_precision"] == 1.0
    assert out["offdiag_mass"] == pytest.approx(0.25)  # rows 0, 1 move half their mass off the diagonal
    assert out["chance_offdiag_precision"] == pytest.approx(2 / 12)
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.target_quality(torch.ones(4, 4), truth)


def test_chance_levels_are_what_random_features_score():
    """Chance is a claim about models that know nothing: random features must score about it."""
    g = torch.Generator().manual_seed(0)
    n, c = 400, 8
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.randint(1, c, (200,), generator=g)])  # unbalanced
    chance = metrics.zeroshot_chance(labels, c)
    assert chance["top1"] == 0.5 and chance["mean_per_class_recall"] == 1 / c  # the majority class wins top-1
    text_to_image = torch.arange(n).repeat(2)  # two captions per image
    rc = metrics.retrieval_chance(text_to_image, n)
    assert rc["t2i_R@5"] == 5 / n and abs(rc["i2t_R@1"] - 2 / (2 * n)) < 1e-12
    rand = lambda m: torch.nn.functional.normalize(torch.randn(m, 64, generator=g), dim=-1)  # noqa: E731
    scores = [metrics.retrieval_metrics(rand(n), rand(2 * n), text_to_image) for _ in range(20)]
    for key in ("i2t_R@10", "t2i_R@10"):
        mean = sum(s[key] for s in scores) / len(scores)
        assert abs(mean - rc[key]) < 0.01, (key, mean, rc[key])
    balanced = [metrics.zeroshot_metrics(rand(n), rand(c), labels)["mean_per_class_recall"] for _ in range(50)]
    assert abs(sum(balanced) / 50 - 1 / c) < 0.02
