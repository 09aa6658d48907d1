"""The one place a method name becomes targets and a loss (methods.md §1-5).

`method_loss` takes the *local* batch; it gathers to the global batch itself (`pdclip.distributed`),
so soft targets under DDP see every pair, as the papers' equations assume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pdclip.config import LossConfig
from pdclip.distributed import gather_features
from pdclip.losses import check_features, symmetric_soft_ce
from pdclip.targets import identity_targets, kd_targets, label_smoothing_targets, otter_targets, psd_targets


@dataclass
class MethodOutput:
    """A method's loss, its parts for the metrics log, and a detached view for snapshots."""

    loss: Tensor  # scalar, with grad
    parts: dict[str, float]
    logits: Tensor  # (B, B) image→text logits of the global batch, detached
    targets_i2t: Tensor  # (B, B)
    targets_t2i: Tensor  # (B, B)


def method_loss(
    cfg: LossConfig,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    logit_scale_soft: Tensor | None = None,
    teacher_image_features: Tensor | None = None,
    teacher_text_features: Tensor | None = None,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
) -> MethodOutput:
    """Loss of `cfg.method` on the global batch.

    Args:
        image_features, text_features: the student's local `(B_local, D)` normalised features.
        logit_scale: the student's multiplier `t` (exponentiated, clamped).
        logit_scale_soft: OTTER's second multiplier `t_s` for the soft term (KD / OTTER); defaults to `t`.
        teacher_image_features, teacher_text_features: the EMA teacher's local features, `(B_local, D)`;
            required by `kd`, `otter` and PSD with `psd_teacher="ema"`.
        alpha: PSD's progressive weight at this step.
        generator: RNG for PSD's subset; seed it identically on every rank.
    """
    img = gather_features(image_features, with_grad=True)
    txt = gather_features(text_features, with_grad=True)
    check_features(img, txt)
    similarity = img @ txt.T
    logits = logit_scale * similarity
    n, device = logits.shape[0], logits.device
    parts: dict[str, float] = {}

    if cfg.method in ("clip", "ls", "psd"):
        if cfg.method == "clip":
            y_i2t = y_t2i = identity_targets(n, device)
        elif cfg.method == "ls":
            y_i2t = y_t2i = label_smoothing_targets(n, cfg.ls_epsilon, device)
        else:
            teacher_logits = logits
            if cfg.psd_teacher == "ema":
                t_img, t_txt = _gathered_teacher(teacher_image_features, teacher_text_features)
                teacher_logits = logit_scale * t_img @ t_txt.T
            y_i2t, y_t2i = psd_targets(teacher_logits, alpha, cfg.psd_subset, cfg.psd_temperature, generator)
            parts["alpha"] = float(alpha)
        loss = symmetric_soft_ce(logits, y_i2t, y_t2i)
    else:  # kd, otter: L = a L_clip(t_c) + (1 - a) L_soft(Y, t_s)
        t_img, t_txt = _gathered_teacher(teacher_image_features, teacher_text_features)
        if cfg.method == "kd":
            y_i2t, y_t2i = kd_targets(t_img, t_txt, cfg.kd_tau)
        else:
            y_i2t, y_t2i = otter_targets(t_img, t_txt, cfg.ot_epsilon, cfg.ot_iters, cfg.ot_lambda)
        eye = identity_targets(n, device)
        loss_clip = symmetric_soft_ce(logits, eye, eye)
        scale_soft = logit_scale if logit_scale_soft is None else logit_scale_soft
        loss_soft = symmetric_soft_ce(scale_soft * similarity, y_i2t, y_t2i)
        loss = cfg.mix_alpha * loss_clip + (1 - cfg.mix_alpha) * loss_soft
        parts.update(loss_clip=loss_clip.item(), loss_soft=loss_soft.item())

    parts["loss"] = loss.item()
    return MethodOutput(loss, parts, logits.detach(), y_i2t, y_t2i)


def _gathered_teacher(image_features: Tensor | None, text_features: Tensor | None) -> tuple[Tensor, Tensor]:
    if image_features is None or text_features is None:
        raise ValueError("this method needs teacher_image_features and teacher_text_features (an EMA teacher)")
    return gather_features(image_features, with_grad=False), gather_features(text_features, with_grad=False)
