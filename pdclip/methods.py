"""The one place a method name becomes targets and a loss (docs/methods.md §1-5, §8).

`method_loss` takes the *local* batch; it gathers to the global batch itself (`pdclip.distributed`),
so soft targets under DDP see every pair, as the papers' equations assume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from pdclip.config import LossConfig
from pdclip.distributed import gather_features
from pdclip.fast import fast_symmetric_hard_ce, fast_symmetric_soft_ce, symmetric_identity_soft_rows_ce
from pdclip.losses import (
    check_feature_pair,
    symmetric_hard_ce,
    symmetric_soft_ce,
)
from pdclip.positives import positive_targets
from pdclip.targets import (
    identity_targets,
    kd_targets,
    label_smoothing_targets,
    otter_targets,
    psd_mix,
    psd_soft_rows,
    psd_subset,
)


@dataclass
class MethodOutput:
    """A method's loss, its parts for the metrics log, and a detached view for snapshots."""

    loss: Tensor  # scalar, with grad
    # Detached scalar tensors (and PSD's alpha, a float): the training loop reads them all in one host
    # sync per step; `float(v)` reads one. `train_confidence`: the batch's mean image→text softmax on
    # the given caption; `target_offdiag`: the targets' mean mass off it (PSD, KD, OTTER).
    parts: dict[str, Tensor | float]
    logits: Tensor  # (B, B) image→text logits of the global batch, detached
    # The (B, B) targets, built only when asked for (snapshots): CLIP's and PSD's losses do without them.
    make_targets: Callable[[], tuple[Tensor, Tensor]]

    @cached_property
    def targets(self) -> tuple[Tensor, Tensor]:
        """`(Y_i2t, Y_t2i)`, each `(B, B)`."""
        return self.make_targets()

    @property
    def targets_i2t(self) -> Tensor:
        return self.targets[0]

    @property
    def targets_t2i(self) -> Tensor:
        return self.targets[1]


def method_loss(
    cfg: LossConfig,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    logit_scale_soft: Tensor | None = None,
    teacher_image_features: Tensor | None = None,
    teacher_text_features: Tensor | None = None,
    teacher_logit_scale: Tensor | None = None,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
    caption_keys: Tensor | None = None,
    image_keys: Tensor | None = None,
    check_finite: bool = True,
) -> MethodOutput:
    """Loss of `cfg.method` on the global batch.

    Args:
        image_features, text_features: the student's local `(B_local, D)` normalised features.
        logit_scale: the student's multiplier `t` (exponentiated, clamped).
        logit_scale_soft: OTTER's second multiplier `t_s` for the soft term (KD / OTTER); defaults to `t`.
        teacher_image_features, teacher_text_features: the teacher network's local features,
            `(B_local, D)`; required by `kd`, `otter` and PSD with `psd_teacher` "ema" or "snapshot".
        teacher_logit_scale: the teacher network's own multiplier (exponentiated, clamped); required
            by PSD with `psd_teacher` "ema" or "snapshot", whose predictions use their own temperature.
        alpha: PSD's progressive weight at this step.
        generator: RNG for PSD's subset; seed it identically on every rank.
        caption_keys, image_keys: the local `(B_local,)` int64 keys of `pdclip.positives`; required by
            `cfg.multi_positive` (and `cfg.positive_images`), gathered here so that equality is decided
            on the global batch.
        check_finite: raise a clear error on NaN / Inf features or costs. Each check reads the device
            (a host sync), so the training loop turns them off and checks its loss once per step.
    """
    img = gather_features(image_features, with_grad=True)
    txt = gather_features(text_features, with_grad=True)
    check_feature_pair(img, txt, finite=check_finite)
    similarity = img @ txt.T
    logits = logit_scale * similarity
    n, device = logits.shape[0], logits.device
    parts: dict[str, Tensor | float] = {}
    # Without multi-positive targets the hard targets are `I`, and no loss builds it: CLIP (and KD's and
    # OTTER's hard half) take integer labels.
    hard = hard_targets(cfg, device, caption_keys, image_keys)
    # The plain definitions (pdclip.losses) unless cfg.fast_loss asks for their speed paths (pdclip.fast).
    soft_ce, hard_ce = (fast_symmetric_soft_ce, fast_symmetric_hard_ce) if cfg.fast_loss else (
        symmetric_soft_ce, symmetric_hard_ce)

    def clip_term(x: Tensor) -> Tensor:  # CLIP's loss, and KD's and OTTER's hard half
        return hard_ce(x) if hard is None else soft_ce(x, hard, hard)

    def identity() -> tuple[Tensor, Tensor]:
        return identity_targets(n, device), identity_targets(n, device)

    if cfg.method == "clip":
        loss = clip_term(logits)
        make_targets = identity if hard is None else _known(hard, hard)
    elif cfg.method == "ls":
        y = label_smoothing_targets(n, cfg.ls_epsilon, device, hard=hard)
        loss, make_targets = soft_ce(logits, y, y), _known(y, y)
    elif cfg.method == "psd":
        teacher_logits = psd_teacher_logits(cfg.psd_teacher, logits, img, txt, logit_scale, teacher_image_features,
                                            teacher_text_features, teacher_logit_scale)
        chosen = psd_subset(n, cfg.psd_subset, generator, device)
        # The self teacher at T = 1 predicts softmax(s), the loss's own softmax: the fast loss reuses it,
        # and its soft rows are built only if a snapshot asks for the targets.
        fast = cfg.fast_loss and hard is None  # CE(s, Y) from its closed-form gradient, no (B, B) Y
        own = fast and cfg.psd_teacher == "self" and cfg.psd_temperature == 1
        soft = None if own else psd_soft_rows(teacher_logits, chosen, cfg.psd_temperature)

        def make_targets() -> tuple[Tensor, Tensor]:
            return psd_mix(chosen, *(soft or psd_soft_rows(teacher_logits, chosen, cfg.psd_temperature)), alpha, hard)

        if fast:
            p_i2t, p_t2i = soft or (None, None)
            loss = symmetric_identity_soft_rows_ce(logits, chosen, p_i2t, p_t2i, alpha)
        else:  # PSD as its definition: CE(s, Y) with Y = (1 - α) I + α P on the chosen rows
            y_i2t, y_t2i = make_targets()
            loss, make_targets = soft_ce(logits, y_i2t, y_t2i), _known(y_i2t, y_t2i)  # built once
        parts["alpha"] = float(alpha)
        if soft is not None and hard is None:  # α x the teacher's mass off the given caption, per row
            off = 1 - soft[0].gather(1, chosen[:, None])
            parts["target_offdiag"] = alpha * off.sum() / n
    else:  # kd, otter: L = a L_clip(t_c) + (1 - a) L_soft(Y, t_s)
        t_img, t_txt = _gathered_teacher(teacher_image_features, teacher_text_features)
        if cfg.method == "kd":
            y_i2t, y_t2i = kd_targets(t_img, t_txt, cfg.kd_tau)
        else:
            y_i2t, y_t2i = otter_targets(t_img, t_txt, cfg.ot_epsilon, cfg.ot_iters, cfg.ot_lambda,
                                         check_finite=check_finite)
        loss_clip = clip_term(logits)
        scale_soft = logit_scale if logit_scale_soft is None else logit_scale_soft
        loss_soft = soft_ce(scale_soft * similarity, y_i2t, y_t2i)
        loss = cfg.mix_alpha * loss_clip + (1 - cfg.mix_alpha) * loss_soft
        parts.update(loss_clip=loss_clip.detach(), loss_soft=loss_soft.detach(),
                     target_offdiag=1 - y_i2t.diagonal().mean())  # of the soft term's targets
        make_targets = _known(y_i2t, y_t2i)

    parts["loss"] = loss.detach()
    # How sure the student is of its own training pairs: a self-teacher that puts most of its mass on
    # the given caption only echoes the (possibly wrong) label (docs/methods.md §5).
    # Only the diagonal of the softmax: no second (B, B) matrix on the hot path.
    detached = logits.detach()
    parts["train_confidence"] = (detached.diagonal() - detached.logsumexp(-1)).exp().mean()
    return MethodOutput(loss, parts, logits.detach(), make_targets)


def _known(y_i2t: Tensor, y_t2i: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    return lambda: (y_i2t, y_t2i)


@torch.no_grad()
def hard_targets(cfg: LossConfig, device: torch.device, caption_keys: Tensor | None,
                 image_keys: Tensor | None) -> Tensor | None:
    """The `(B, B)` hard targets every method starts from: with `cfg.multi_positive` the multi-positive
    base over the global batch (docs/methods.md §8); `None` stands for `I`, which no loss needs built."""
    if not cfg.multi_positive:
        return None
    if caption_keys is None or (cfg.positive_images and image_keys is None):
        raise ValueError("multi_positive needs caption_keys (and positive_images needs image_keys): "
                         "pdclip.positives.caption_keys(texts), image_keys(images)")
    keys = gather_features(caption_keys.to(device), with_grad=False)
    images = gather_features(image_keys.to(device), with_grad=False) if cfg.positive_images else None
    base = positive_targets(keys, images)
    # A batch without repeats: I, and the losses' faster paths (the same on every rank: keys are global).
    return None if bool((base.diagonal() == 1).all()) else base


@torch.no_grad()
def psd_teacher_logits(
    teacher: str,
    logits: Tensor,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    teacher_image_features: Tensor | None = None,
    teacher_text_features: Tensor | None = None,
    teacher_logit_scale: Tensor | None = None,
) -> Tensor:
    """The image→text logits PSD's teacher predicts with, `(B, B)`, no grad (docs/methods.md §5, reconstruction).

    - "self": the student's own logits `t U Vᵀ`, detached. The targets are then the student's own
      predictions, and at `T_soft = 1` PSD's gradient is CLIP's scaled by `1 - α` on the chosen rows.
    - "intra": `t (U Uᵀ + V Vᵀ) / 2` of the same forward, detached: caption j fits image i as much as
      image j resembles image i and caption j resembles caption i (KD's and OTTER's intra-modal terms).
    - "ema", "snapshot": the teacher network's `t_teacher U_t V_tᵀ`, at the teacher's own temperature.

    Args:
        logits: the student's image→text logits `t U Vᵀ`, `(B, B)`.
        image_features, text_features: the student's *global* normalised features, `(B, D)`.
        logit_scale: the student's multiplier `t`.
        teacher_image_features, teacher_text_features: the teacher network's *local* features.
        teacher_logit_scale: the teacher network's multiplier.
    """
    if teacher == "self":
        return logits.detach()
    if teacher == "intra":
        return logit_scale * (image_features @ image_features.T + text_features @ text_features.T) / 2
    if teacher_logit_scale is None:
        raise ValueError(f"psd_teacher={teacher!r} needs teacher_logit_scale (the teacher network's own multiplier)")
    t_img, t_txt = _gathered_teacher(teacher_image_features, teacher_text_features)
    return teacher_logit_scale * t_img @ t_txt.T


def _gathered_teacher(image_features: Tensor | None, text_features: Tensor | None) -> tuple[Tensor, Tensor]:
    if image_features is None or text_features is None:
        raise ValueError("this method needs teacher_image_features and teacher_text_features (a teacher network)")
    return gather_features(image_features, with_grad=False), gather_features(text_features, with_grad=False)
