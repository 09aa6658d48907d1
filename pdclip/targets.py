"""Soft-target makers: `(B, B)` row-stochastic matrices that carry no gradient (methods.md §1-5).

Image→text targets `Y^{I→T}` are indexed `[image i, caption j]`; text→image targets `Y^{T→I}` are
indexed `[caption j, image i]`. Everything here is pure and runs under `torch.no_grad()`.

Taught in notebooks 02 (LS, KD), 03 (PSD) and 04 (Sinkhorn, OTTER).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def identity_targets(n: int, device: torch.device | str | None = None) -> Tensor:
    """CLIP's hard targets `I`, `(n, n)` (methods.md §1)."""
    return torch.eye(n, device=device)


def label_smoothing_targets(n: int, epsilon: float, device: torch.device | str | None = None) -> Tensor:
    """`(1 - ε) I + ε / (n - 1) (11ᵀ - I)`, `(n, n)` (methods.md §2)."""
    off = torch.full((n, n), epsilon / (n - 1), device=device)
    return off.fill_diagonal_(1.0 - epsilon)


def _similarities(image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher cosine similarities `S_vv, S_tt, S_vt`, each `(B, B)`, in float32."""
    u, v = image_features.float(), text_features.float()
    return u @ u.T, v @ v.T, u @ v.T


@torch.no_grad()
def kd_targets(image_features: Tensor, text_features: Tensor, tau: float = 100.0) -> tuple[Tensor, Tensor]:
    """KD targets `softmax_row(τ (S_vv + S_tt + S_vt))` and its text→image twin (methods.md §3).

    Args:
        image_features, text_features: the teacher's normalised embeddings, `(B, D)`.
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`.
    """
    s_vv, s_tt, s_vt = _similarities(image_features, text_features)
    base = s_vv + s_tt
    return (tau * (base + s_vt)).softmax(dim=-1), (tau * (base + s_vt.T)).softmax(dim=-1)


@torch.no_grad()
def sinkhorn(cost: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Entropic optimal-transport plan with uniform marginals, in the log domain (methods.md §4).

    Solves `min_Q <Q, C> - ε H(Q)` s.t. `Q 1 = 1/n`, `Qᵀ 1 = 1/m` by Sinkhorn–Knopp in the same order as
    POT's `ot.sinkhorn` (columns, then rows, per iteration; the rows end exact). Log-sum-exp keeps it
    finite for small `ε`, where `exp(-C/ε)` overflows; work is in float32 whatever the input dtype.

    Args:
        cost: `(..., n, m)`, a batch of cost matrices.
        epsilon: entropic regularisation `ε > 0`.
        n_iters: number of Sinkhorn iterations (OTTER uses 5).
    Returns:
        The plan `Q`, `(..., n, m)`, float32, summing to 1 over its last two dims.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or Inf")
    log_k = -cost.float() / epsilon
    n, m = log_k.shape[-2:]
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.full(log_k.shape[:-1], log_a, device=log_k.device)
    for _ in range(n_iters):
        g = log_b - torch.logsumexp(log_k + f.unsqueeze(-1), dim=-2)
        f = log_a - torch.logsumexp(log_k + g.unsqueeze(-2), dim=-1)
    return torch.exp(f.unsqueeze(-1) + log_k + g.unsqueeze(-2))


@torch.no_grad()
def otter_targets(
    image_features: Tensor,
    text_features: Tensor,
    epsilon: float = 0.15,
    n_iters: int = 5,
    lam: float = 100.0,
) -> tuple[Tensor, Tensor]:
    """OTTER's targets: row-normalised Sinkhorn plans over the teacher's similarities (methods.md §4).

    Cost `C^{I→T} = -((S_vv - λI) + (S_tt - λI) + S_vt)`: the large `λ` keeps the plan off the positive
    pair, so the targets model only the *other* matches in the batch (the hard term of OTTER's loss
    covers the positive). Pass *globally gathered* features under DDP so the masked diagonal is the
    global one (the released code masks `eye(b, N)`, right only on rank 0).

    Args:
        image_features, text_features: the teacher's normalised embeddings, `(B, D)`.
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`, rows sum to 1.
    """
    s_vv, s_tt, s_vt = _similarities(image_features, text_features)
    masked = s_vv + s_tt - 2 * lam * torch.eye(s_vv.shape[0], device=s_vv.device)
    cost = -torch.stack([masked + s_vt, masked + s_vt.T])
    plan = sinkhorn(cost, epsilon, n_iters)
    targets = plan / plan.sum(dim=-1, keepdim=True)
    return targets[0], targets[1]


@torch.no_grad()
def psd_targets(
    logits: Tensor,
    alpha: float,
    subset: float = 0.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Progressive self-distillation targets (methods.md §5 — pdclip's *reconstruction*).

    The teacher's predictions `P = softmax_row(s / T)` (and `softmax_row(sᵀ / T)`) are mixed into the
    hard targets, `Y_i = (1 - α) e_i + α P_i`, for a random subset of a fraction `ρ` of the pairs;
    the other rows keep `e_i`. A pair in the subset gets soft targets in both directions.

    Args:
        logits: teacher image→text logits `s`, `(B, B)` — the student's own, detached, by default.
        alpha: the progressive weight `α_k` (`pdclip.schedules.psd_alpha`); `α = 0` gives `I`.
        subset: `ρ`, the fraction of pairs that get soft targets.
        temperature: `T_soft`; 1 uses the student's own temperature.
        generator: RNG for the subset (seed it identically on every rank under DDP).
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`.
    """
    n = logits.shape[0]
    eye = torch.eye(n, device=logits.device)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[: round(subset * n)]] = True
    weight = (alpha * chosen.float()).to(logits.device).unsqueeze(-1)  # (B, 1): α on chosen rows, else 0
    s = logits.detach().float() / temperature
    return tuple((1 - weight) * eye + weight * p.softmax(dim=-1) for p in (s, s.T))
