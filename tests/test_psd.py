"""PSD's teachers: the same-forward teacher at T = 1 is a reweighted CLIP; the others distil something.

For the chosen rows, PSD's gradient w.r.t. the logits is `softmax(s_i) - Y_i`. With the student's own
detached predictions at `T = 1` that is `(1 - α)(softmax(s_i) - e_i)`: CLIP's gradient row, rescaled.
A teacher that carries information must turn that row, i.e. change its *direction*.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdclip.checkpoint import read_checkpoint
from pdclip.config import PSD_TEACHERS, LossConfig, TrainConfig
from pdclip.losses import soft_cross_entropy
from pdclip.methods import method_loss
from pdclip.targets import psd_subset
from pdclip.teacher import SnapshotTeacher
from pdclip.train import Trainer, fit

B, ALPHA, SCALE, TEACHER_SCALE = 16, 0.4, 14.0, 9.0
# 1 - cos = θ²/2 for rows turned by θ: the degenerate teacher stays at float64 round-off (~1e-16), the
# teachers that carry information turn rows by more than 1e-3 rad here (intra, the least, ~2e-3).
TOL = 1e-9
DEGENERATE = {"psd_teacher": "self", "psd_temperature": 1.0}
DISTILLING = [{}, {"psd_teacher": "self", "psd_temperature": 2.0}, {"psd_teacher": "self", "psd_temperature": 0.5},
              {"psd_teacher": "ema"}, {"psd_teacher": "snapshot"}, {"psd_teacher": "intra"}]


def clustered_features(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Student and teacher features `(B, 32)` of 4 concepts: neighbours for the soft targets to find."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 32, generator=g)[torch.arange(B) % 4]
    img = F.normalize(centres + 0.4 * torch.randn(B, 32, generator=g), dim=-1)
    txt = F.normalize(centres + 0.4 * torch.randn(B, 32, generator=g), dim=-1)
    # The teacher network: the student a few steps away.
    t_img = F.normalize(img + 0.3 * torch.randn(B, 32, generator=g), dim=-1)
    t_txt = F.normalize(txt + 0.3 * torch.randn(B, 32, generator=g), dim=-1)
    return img, txt, t_img, t_txt


def psd_output(variant: dict):
    img, txt, t_img, t_txt = clustered_features()
    return method_loss(LossConfig(method="psd", **variant), img, txt, torch.tensor(SCALE),
                       teacher_image_features=t_img, teacher_text_features=t_txt,
                       teacher_logit_scale=torch.tensor(TEACHER_SCALE), alpha=ALPHA,
                       generator=torch.Generator().manual_seed(0))


def row_cosines(variant: dict) -> torch.Tensor:
    """Cosine, per chosen row and direction, between the PSD and CLIP gradients w.r.t. the logits
    (in float64, so that round-off does not hide or fake a turn)."""
    out = psd_output(variant)
    chosen = out.targets_i2t.diagonal() < 1  # the same pairs are soft in both directions
    assert chosen.sum() == B // 2
    eye = torch.eye(B, dtype=torch.float64)
    cosines = []
    for s, y in ((out.logits, out.targets_i2t), (out.logits.T, out.targets_t2i)):
        s = s.double().requires_grad_()
        g_psd, = torch.autograd.grad(soft_cross_entropy(s, y.double()), s)
        g_clip, = torch.autograd.grad(soft_cross_entropy(s, eye), s)
        cosines.append(F.cosine_similarity(g_psd[chosen], g_clip[chosen], dim=-1))
    return torch.cat(cosines)


def test_degenerate_teacher_only_rescales_clips_gradient():
    cos = row_cosines(DEGENERATE)
    assert (cos >= 1 - TOL).all()


@pytest.mark.parametrize("variant", DISTILLING, ids=lambda v: "default" if not v else "-".join(map(str, v.values())))
def test_distilling_teachers_turn_clips_gradient(variant):
    assert (row_cosines(variant) < 1 - TOL).all()


def test_default_is_not_the_degenerate_teacher():
    cfg = LossConfig(method="psd")
    assert not (cfg.psd_teacher == "self" and cfg.psd_temperature == 1.0)


def test_degenerate_gradient_is_clips_scaled_by_one_minus_alpha():
    """The identity itself, at the level of the features: both directions, the same subset."""
    img, txt = (x.double() for x in clustered_features()[:2])
    img.requires_grad_()
    out = method_loss(LossConfig(method="psd", **DEGENERATE), img, txt, torch.tensor(SCALE), alpha=ALPHA,
                      generator=torch.Generator().manual_seed(0))
    g_psd, = torch.autograd.grad(out.loss, img)
    chosen = psd_subset(B, LossConfig.psd_subset, torch.Generator().manual_seed(0))
    weight = torch.ones(B, dtype=img.dtype).index_fill_(0, chosen, 1 - ALPHA)  # (B,): 1 - α on the chosen pairs
    logits, labels = SCALE * img @ txt.T, torch.arange(B)
    weighted_clip = 0.5 * ((weight * F.cross_entropy(logits, labels, reduction="none")).mean()
                           + (weight * F.cross_entropy(logits.T, labels, reduction="none")).mean())
    g_clip, = torch.autograd.grad(weighted_clip, img)
    torch.testing.assert_close(g_psd, g_clip, rtol=0, atol=1e-12)  # float64 throughout: round-off only


def test_loss_config_names_bad_psd_options():
    with pytest.raises(ValueError, match="psd_teacher must be one of"):
        LossConfig(psd_teacher="previous")
    with pytest.raises(ValueError, match="psd_snapshot_every must be >= 1"):
        LossConfig(psd_snapshot_every=0)


def test_network_teachers_need_their_own_temperature():
    img, txt, t_img, t_txt = clustered_features()
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        method_loss(LossConfig(method="psd", psd_teacher="ema"), img, txt, torch.tensor(SCALE),
                    teacher_image_features=t_img, teacher_text_features=t_txt, alpha=ALPHA)


# ---- the teachers in the training loop ------------------------------------------------------------------


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    """16 pairs, batch 16, a few steps of PSD with every soft row at full weight."""
    base = TrainConfig(out=str(tmp_path / name), steps=6, batch_size=16, lr=1e-3, warmup_steps=1,
                       data_kwargs={"n_train": 16, "n_eval": 16}, snapshot_every=3, snapshot_size=8,
                       save_every=2, progress=False)
    return base.with_overrides({"method": "psd", "psd_subset": 1.0, **overrides})


@pytest.mark.parametrize("teacher", PSD_TEACHERS)
def test_every_teacher_trains(tmp_path, teacher):
    summary = fit(tiny(tmp_path, psd_teacher=teacher, psd_snapshot_every=2))
    assert summary["step"] == 6 and math.isfinite(summary["last"]["loss"])
    has_network = teacher in ("ema", "snapshot")
    assert bool(read_checkpoint(summary["checkpoint"])["teacher"]) == has_network


def test_snapshot_teacher_refreshes_on_schedule():
    student = nn.Linear(3, 2)
    teacher = SnapshotTeacher(student, every=3)
    seen = []
    for step in range(7):
        teacher.update(student)  # before the step's forward, as the loop calls it
        seen.append(teacher.module.weight[0, 0].item())
        with torch.no_grad():
            student.weight.fill_(step + 1.0)  # the optimiser step
    initial = seen[0]
    assert seen == [initial, initial, initial, 3.0, 3.0, 3.0, 6.0]  # the student of steps 0, 3, 6
    with pytest.raises(ValueError, match="psd_snapshot_every"):
        SnapshotTeacher(student, every=0)


def test_snapshot_teacher_shares_frozen_parameters():
    student = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    student[0].requires_grad_(False)
    teacher = SnapshotTeacher(student, every=2)
    assert teacher.module[0].weight is student[0].weight and teacher.module[1].weight is not student[1].weight


def test_snapshot_teacher_resumes_exactly(tmp_path):
    opts = {"psd_teacher": "snapshot", "psd_snapshot_every": 3, "steps": 7, "save_every": 2}
    fit(tiny(tmp_path, "full", **opts))

    def stop_at_step_5(model, step):
        if step == 5:  # the last checkpoint is step 4, inside a refresh period (refreshed at step 3)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, "killed", eval_every=5, **opts), eval_fn=stop_at_step_5)
    assert read_checkpoint(tmp_path / "killed")["teacher"]["num_updates"] == 4
    fit(tiny(tmp_path, "killed", resume=True, **opts))
    full, resumed = (read_checkpoint(tmp_path / name)["teacher"]["module"] for name in ("full", "killed"))
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("full", "killed")]
    assert len(losses[1]) == 7 and losses[1] == pytest.approx(losses[0], abs=1e-6, rel=0)


def test_ema_teacher_predicts_at_its_own_temperature(tmp_path):
    trainer = Trainer(tiny(tmp_path, psd_teacher="ema", psd_alpha_max=1.0, snapshot_every=0))
    with torch.no_grad():
        trainer.teacher.module.logit_scale.fill_(math.log(2.0))  # the student's stays at 1 / 0.07
    batch = next(trainer.batches)
    result, _ = trainer.forward_loss(trainer.model, batch, alpha=1.0, generator=torch.Generator())
    teacher = trainer.teacher.module
    with torch.no_grad():
        t_img = teacher.encode_image(batch["image"])
        t_txt = teacher.encode_text(teacher.tokenize(batch["text"]))
    torch.testing.assert_close(result.targets_i2t, (2.0 * t_img @ t_txt.T).softmax(-1))


@pytest.mark.parametrize("variant", DISTILLING + [{"fast_loss": True, "psd_teacher": "ema"}])
def test_logged_target_mass_and_confidence_are_what_they_say(variant):
    out = psd_output(variant)
    off_diagonal = 1 - out.targets_i2t.diagonal().mean()  # the targets' mean mass off the given caption
    assert float(out.parts["target_offdiag"]) == pytest.approx(float(off_diagonal), abs=1e-6)
    assert float(off_diagonal) > 0.01  # something to measure: ALPHA x half the rows x the teacher's spread
    confidence = out.logits.softmax(-1).diagonal().mean()
    assert float(out.parts["train_confidence"]) == pytest.approx(float(confidence), abs=1e-6)
