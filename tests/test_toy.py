"""pdclip.toy, notebook 03's toy problem: deterministic, learnable by CLIP, and scored as documented."""

import math

import torch
import torch.nn.functional as F

from pdclip.config import LossConfig
from pdclip.losses import clip_loss
from pdclip.methods import method_loss
from pdclip.toy import toy_pairs, train_toy


def clip(u, v, step, teacher_features):
    return clip_loss(F.normalize(u, dim=-1), F.normalize(v, dim=-1), torch.tensor(10.0))


def test_clip_learns_the_toy_concepts_and_runs_repeat():
    pairs = toy_pairs(n_pairs=256, n_concepts=8, seed=1)
    assert pairs.x_image.shape == pairs.x_text.shape == (256, 32) and len(pairs) == 256
    first, again = train_toy(clip, pairs, steps=150, seed=1), train_toy(clip, pairs, steps=150, seed=1)
    assert first["losses"] == again["losses"]
    assert first["concept_acc"] > 0.6 > 1 / 8 and first["loss_last"] < first["loss_first"]
    assert 1 <= first["distinct_captions"] <= 256 and 0 <= first["r1"] <= first["concept_acc"]


def test_a_network_teacher_reaches_the_loss():
    seen = []

    def psd(u, v, step, teacher_features):
        seen.append(sorted(teacher_features))
        u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        return method_loss(LossConfig(method="psd", psd_teacher="ema"), u, v, torch.tensor(10.0), alpha=0.5,
                           **teacher_features).loss

    train_toy(psd, toy_pairs(n_pairs=64), steps=3, batch_size=16, teacher=LossConfig(method="psd", psd_teacher="ema"))
    assert seen == [["teacher_image_features", "teacher_logit_scale", "teacher_text_features"]] * 3


def test_mismatched_captions_and_a_heldout_split_of_the_same_concepts():
    train, again = toy_pairs(n_pairs=2000, mismatch=0.5, seed=3), toy_pairs(n_pairs=2000, mismatch=0.5, seed=3)
    test = toy_pairs(n_pairs=2000, seed=3, split="test")
    assert torch.equal(train.x_text, again.x_text) and not torch.equal(train.x_image, test.x_image)
    wrong = (train.text_concept != train.concept).float().mean().item()
    assert abs(wrong - 0.5 * 15 / 16) < 0.05  # a random concept is the right one 1 time in 16
    assert torch.equal(test.text_concept, test.concept)  # mismatch defaults to 0
    centre = lambda p, c: p.x_image[p.concept == c].mean(0)  # noqa: E731
    assert (centre(train, 0) - centre(test, 0)).norm() < 1.0 < (centre(train, 0) - centre(train, 1)).norm()


def test_a_method_output_logs_its_parts_and_heldout_pairs_are_scored_during_training():
    pairs, heldout = toy_pairs(n_pairs=128, mismatch=0.3), toy_pairs(n_pairs=64, split="test")
    cfg = LossConfig(method="psd", psd_teacher="self")

    def psd(u, v, step, teacher_features):
        return method_loss(cfg, F.normalize(u, dim=-1), F.normalize(v, dim=-1), torch.tensor(10.0), alpha=0.5)

    run = train_toy(psd, pairs, steps=6, batch_size=16, heldout=heldout, heldout_every=2)
    assert [step for step, _ in run["heldout_curve"]] == [2, 4, 6]
    assert run["heldout_curve"][-1][1] == run["heldout_concept_acc"]
    assert 0 < run["train_confidence"] < 1 and 0 < run["target_offdiag"] <= 0.5 * 0.5  # alpha x rho at most
    assert math.isnan(train_toy(clip, pairs, steps=2, batch_size=16)["train_confidence"])  # a bare loss logs none
