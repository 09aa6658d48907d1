"""Speed paths for the losses, opt-in (`LossConfig.fast_loss=True`): the same values and gradients as
the plain definitions in `pdclip.losses`, cheaper on a CPU at large batches. tests/test_losses.py pins
each one to its plain twin.

- `transposed`: the text→image half of a symmetric loss on a contiguous transpose. On a CPU the two
  directions' gradients meeting as a tensor plus a transposed view cost 195 ms at B = 4096 (one
  thread), against 42 ms for a transposing copy and 35 ms for a plain add (benchmarks/loss_overhead.py).
- `identity_soft_rows_ce`: PSD's loss from its closed-form gradient, without its `(B, B)` targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pdclip.losses import soft_cross_entropy


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


def fast_symmetric_soft_ce(logits: Tensor, targets_i2t: Tensor, targets_t2i: Tensor) -> Tensor:
    """`pdclip.losses.symmetric_soft_ce`, its text→image half on `transposed(logits)`."""
    return 0.5 * (soft_cross_entropy(logits, targets_i2t) + soft_cross_entropy(transposed(logits), targets_t2i))


def fast_symmetric_hard_ce(logits: Tensor) -> Tensor:
    """`pdclip.losses.symmetric_hard_ce`, its text→image half on `transposed(logits)`."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(transposed(logits), labels))
