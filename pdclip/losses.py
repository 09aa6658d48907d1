"""Contrastive losses over `(image_features, text_features, logit_scale)` (docs/methods.md §1).

Every method in pdclip is *one* symmetric soft-target cross-entropy; only the `(B, B)` targets differ
(see `pdclip.targets`). `logit_scale` is the exponentiated multiplier `t`, as open_clip's model
returns it — not the log value stored on the model.

Taught in notebooks/01_clip_loss.ipynb and notebooks/02_soft_targets.ipynb. These are the plain
definitions, and the default; `pdclip.fast` holds faster equivalents (`LossConfig.fast_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Row sums of targets are compared to 1 with this tolerance; loose enough for bf16 teachers.
_ROW_SUM_ATOL = 1e-3


def check_feature_pair(image_features: Tensor, text_features: Tensor, finite: bool = True) -> None:
    """Raise a ValueError naming the problem unless both are finite `(B, D)` tensors, B >= 2, same dtype.

    `finite=False` leaves out the values' check, the one that reads the device (a host sync).
    """
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, D), got shape {tuple(x.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape (B, D)"
        )
    if image_features.dtype != text_features.dtype:
        raise ValueError(
            f"image_features ({image_features.dtype}) and text_features ({text_features.dtype}) "
            "must have the same dtype"
        )
    if image_features.shape[0] < 2:
        raise ValueError("a contrastive loss needs a batch of at least 2 pairs, got B = 1")
    for name, x in (("image_features", image_features), ("text_features", text_features)) if finite else ():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or Inf")


def check_targets(targets: Tensor, n: int, name: str = "targets") -> None:
    """Raise a ValueError unless `targets` is `(n, n)`, non-negative, with rows summing to 1."""
    if targets.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {tuple(targets.shape)}")
    if (targets < 0).any():
        raise ValueError(f"{name} has negative entries; targets are probabilities")
    row_sums = targets.float().sum(dim=-1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=_ROW_SUM_ATOL):
        worst = (row_sums - 1).abs().max().item()
        raise ValueError(f"rows of {name} must sum to 1 (worst row is off by {worst:.3g})")


def contrastive_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Image→text logits `s_ij = t <u_i, v_j>`, `(B, B)`; the text→image logits are the transpose."""
    check_feature_pair(image_features, text_features)
    return logit_scale * image_features @ text_features.T


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of `-sum_j targets[i, j] * log_softmax(logits)[i, j]`.

    Args:
        logits: `(B, N)`.
        targets: `(B, N)`, rows sum to 1, no grad.
    """
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def symmetric_soft_ce(logits: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """`½ [CE(s, Y^{I→T}) + CE(sᵀ, Y^{T→I})]` for image→text logits `s`, `(B, B)`."""
    return 0.5 * (soft_cross_entropy(logits, targets_i2t) + soft_cross_entropy(logits.T, targets_t2i))


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE, equal to `open_clip.loss.ClipLoss` on one process.

    Args:
        image_features: `(B, D)`, L2-normalised.
        text_features: `(B, D)`, L2-normalised.
        logit_scale: the multiplier `t = exp(logit_scale)`, a scalar.
    """
    return symmetric_hard_ce(contrastive_logits(image_features, text_features, logit_scale))


def symmetric_hard_ce(logits: Tensor) -> Tensor:
    """`symmetric_soft_ce(logits, I, I)` for square logits `(B, B)`, without building `I`."""
    # Integer labels are the identity targets without materialising a (B, B) matrix.
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def soft_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    targets_i2t: Tensor,
    targets_t2i: Tensor,
) -> Tensor:
    """Symmetric soft-target cross-entropy (docs/methods.md, the equation at the top).

    Args:
        image_features, text_features: `(B, D)`, L2-normalised.
        logit_scale: the multiplier `t`.
        targets_i2t: `(B, B)` row-stochastic targets for image→text rows.
        targets_t2i: `(B, B)` row-stochastic targets for text→image rows.
    """
    logits = contrastive_logits(image_features, text_features, logit_scale)
    n = logits.shape[0]
    check_targets(targets_i2t, n, "targets_i2t")
    check_targets(targets_t2i, n, "targets_t2i")
    return symmetric_soft_ce(logits, targets_i2t.detach(), targets_t2i.detach())
