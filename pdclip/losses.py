"""Contrastive losses over `(image_features, text_features, logit_scale)` (docs/methods.md §1).

Every method in pdclip is *one* symmetric soft-target cross-entropy; only the `(B, B)` targets differ
(see `pdclip.targets`). `logit_scale` is the exponentiated multiplier `t`, as open_clip's model
returns it — not the log value stored on the model.

Taught in notebooks/01_clip_loss.ipynb and notebooks/02_soft_targets.ipynb.
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


class _Transposed(torch.autograd.Function):
    """`x.T` as a contiguous tensor, whose gradient comes back contiguous too (see `transposed`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.T.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.T.contiguous()


def transposed(x: Tensor) -> Tensor:
    """`x.T` for the text→image half of a symmetric loss, `(B, B)` → `(B, B)`, laid out in memory.

    The same values and gradient as `x.T`, but on a CPU an elementwise operation between a tensor and a
    transposed view (the gradients of the two directions meeting in autograd) takes 3–5× as long as a
    transposing copy; at B = 4096 this saves a fifth of CLIP's loss (benchmarks/loss_overhead.py).
    """
    return _Transposed.apply(x)


class _IdentityWithSoftRows(torch.autograd.Function):
    """`identity_soft_rows_ce`'s forward and its closed-form gradient, `(softmax(s) - Y) / B`, which
    needs no `(B, B)` target matrix: the softmax, minus `Y`'s weight on the diagonal, minus `α soft` on
    the chosen rows. The forward computes the gradient as it goes (the self case needs the softmax
    there anyway); the backward scales it in place, because on a CPU a fresh `(B, B)` tensor costs
    more than the multiplication. A second backward through the same graph raises autograd's
    in-place error instead of returning a wrong gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, soft: Tensor | None, alpha: float) -> Tensor:
        n = logits.shape[0]
        log_p = logits.log_softmax(dim=-1)
        grad, diagonal = log_p.exp(), log_p.diagonal()
        if soft is None:  # Y_i = (1 - α) e_i + α softmax(s_i): the soft rows are `grad`'s own
            # Y's weight on e_i, w_i: 1, and 1 - α on the chosen rows. α Σ_chosen Σ_j p log p is then
            # Σ_i (1 - w_i) Σ_j p log p: two dots over (B, B) instead of gathering the chosen rows, and
            # the row weighting is the gradient's own, w_i (p_i - e_i). (The value's float32 round-off
            # grows with B, 3e-6 relative at B = 4096; the gradient's does not.)
            weights = torch.ones(n, dtype=log_p.dtype, device=log_p.device).index_fill_(0, rows, 1 - alpha)
            flat = log_p.reshape(-1)
            total = torch.dot(weights, diagonal) + torch.dot(grad.reshape(-1), flat)
            grad.mul_(weights.unsqueeze(1))
            total = total - torch.dot(grad.reshape(-1), flat)
            grad.diagonal().sub_(weights)
        else:
            chosen = log_p.index_select(0, rows)  # (k, B)
            total = diagonal.sum() - alpha * diagonal.index_select(0, rows).sum() + alpha * (soft * chosen).sum()
            grad.diagonal().sub_(1.0)
            grad.diagonal().index_add_(0, rows, torch.full_like(rows, alpha, dtype=grad.dtype))
            grad.index_add_(0, rows, soft.to(grad.dtype), alpha=-alpha)
        ctx.save_for_backward(grad)
        return -total / n

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        grad, = ctx.saved_tensors
        return grad.mul_(grad_output / grad.shape[0]), None, None, None


def identity_soft_rows_ce(logits: Tensor, rows: Tensor, soft: Tensor | None, alpha: float) -> Tensor:
    """`soft_cross_entropy(logits, Y)` for targets that are `I` except on a few rows, without building `Y`.

    `Y_i = e_i`, and `Y_i = (1 - α) e_i + α soft_r` for `i = rows[r]` (PSD's targets, docs/methods.md §5).

    Args:
        logits: `(B, B)`, square: pair `i`'s right answer is column `i`.
        rows: `(k,)` int64, distinct row indices.
        soft: `(k, B)` row-stochastic, no grad; or None for `softmax(logits)`'s own rows, detached (PSD's
            self teacher at `T_soft = 1`), which costs two dot products instead of `k` softmaxes.
        alpha: the weight of `soft` on the chosen rows.
    """
    if logits.shape[0] != logits.shape[1] or (soft is not None and soft.shape != (len(rows), logits.shape[1])):
        shape = "softmax(logits)" if soft is None else tuple(soft.shape)
        raise ValueError(f"need square logits and (k, B) soft rows; got {tuple(logits.shape)} and {shape}")
    return _IdentityWithSoftRows.apply(logits, rows, None if soft is None else soft.detach(), float(alpha))


def symmetric_identity_soft_rows_ce(logits: Tensor, rows: Tensor, soft_i2t: Tensor | None,
                                    soft_t2i: Tensor | None, alpha: float) -> Tensor:
    """`symmetric_soft_ce` for PSD's targets: `identity_soft_rows_ce` on `s` and on `sᵀ`, the same rows."""
    return 0.5 * (identity_soft_rows_ce(logits, rows, soft_i2t, alpha)
                  + identity_soft_rows_ce(transposed(logits), rows, soft_t2i, alpha))


def symmetric_soft_ce(logits: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """`½ [CE(s, Y^{I→T}) + CE(sᵀ, Y^{T→I})]` for image→text logits `s`, `(B, B)`."""
    return 0.5 * (soft_cross_entropy(logits, targets_i2t) + soft_cross_entropy(transposed(logits), targets_t2i))


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
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(transposed(logits), labels))


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
