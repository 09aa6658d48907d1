"""pdclip.toy, notebook 03's toy problem: deterministic, learnable by CLIP, and scored as documented."""

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
