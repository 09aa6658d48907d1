"""Soft-target makers: `(B, B)` row-stochastic matrices that carry no gradient (docs/methods.md §1-5).

Image→text targets `Y^{I→T}` are indexed `[image i, caption j]`; text→image targets `Y^{T→I}` are
indexed `[caption j, image i]`. Everything here is pure and runs under `torch.no_grad()`.

Taught in notebooks 02 (LS, KD), 03 (PSD) and 04 (Sinkhorn, OTTER).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pdclip.config import LossConfig  # the defaults


def identity_targets(n: int, device: torch.device | str | None = None) -> Tensor:
    """CLIP's hard targets `I`, `(n, n)` (docs/methods.md §1)."""
    return torch.eye(n, device=device)


def label_smoothing_targets(n: int, epsilon: float, device: torch.device | str | None = None,
                            hard: Tensor | None = None) -> Tensor:
    """`(1 - ε) H + ε / (n - 1) (11ᵀ - I)`, `(n, n)`, with hard targets `H = I` by default (docs/methods.md §2).

    Args:
        hard: `(n, n)` hard targets to smooth instead of `I` (the multi-positive base, §8).
    """
    off = torch.full((n, n), epsilon / (n - 1), device=device)
    if hard is None:
        return off.fill_diagonal_(1.0 - epsilon)
    return off.fill_diagonal_(0.0) + (1.0 - epsilon) * hard


def _similarities(image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher cosine similarities `S_II, S_TT, S_IT`, each `(B, B)`, in float32."""
    u, v = image_features.float(), text_features.float()
    return u @ u.T, v @ v.T, u @ v.T


@torch.no_grad()
def kd_targets(image_features: Tensor, text_features: Tensor, tau: float = LossConfig.kd_tau) -> tuple[Tensor, Tensor]:
    """KD targets `softmax_row(τ (S_II + S_TT + S_IT))` and its text→image twin (docs/methods.md §3).

    Args:
        image_features, text_features: the teacher's normalised embeddings, `(B, D)`.
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`.
    """
    s_ii, s_tt, s_it = _similarities(image_features, text_features)
    base = s_ii.add_(s_tt)  # in place (fresh tensors): each (B, B) pass counts at large B
    # S_TI = S_ITᵀ copied into s_tt's buffer: on a CPU, adding a transposed view takes ~3× as long as
    # a transposing copy and a plain addition together.
    s_ti = s_tt.copy_(s_it.T)
    return torch.add(base, s_it).mul_(tau).softmax(dim=-1), base.add_(s_ti).mul_(tau).softmax(dim=-1)


# Devices where `sinkhorn`'s scaling half-steps run by default. Each one reads its scalings' spread on the
# host to decide whether to go back to the log domain: free on a CPU, a stall of the queue on an
# accelerator, where every half-step is a log-domain one instead (no host sync at all).
SCALING_DEVICES = ("cpu",)

# Between log-domain half-steps the plan is `diag(u) E diag(v)`. The scalings may spread E's entries
# apart by at most e^_DRIFT (the spread, max - min, of log u plus that of log v): an entry of E that
# underflowed to 0 in float32 (< 1e-38 of the largest) stays below ~1e-20 of what its row and column
# hold, as negligible as the log domain would have made it.
_DRIFT = 40.0


@torch.no_grad()
def sinkhorn(cost: Tensor, epsilon: float, n_iters: int, total_mass: float = 1.0, *,
             scaling: bool | None = None, check_finite: bool = True) -> Tensor:
    """Entropic optimal-transport plan with uniform marginals, stabilised in the log domain (docs/methods.md §4).

    Solves `min_Q <Q, C> - ε H(Q)` s.t. `Q 1 = 1/n`, `Qᵀ 1 = 1/m` by Sinkhorn–Knopp in the same order as
    POT's `ot.sinkhorn` (columns, then rows, per iteration; the rows end exact). Work is in float32
    whatever the input dtype, and stays finite for small `ε`, where `exp(-C/ε)` overflows:

    - a *log-domain* half-step makes the kernel `E = exp(-C/ε + f ⊕ g)` from the potentials with a
      max-shifted exp (as log-sum-exp does), so nothing overflows;
    - the half-steps after it keep `E` and only update the scalings `u`, `v` of the plan
      `diag(u) E diag(v)`, with one matrix–vector product each and no exp: why this is several times
      faster than a log-sum-exp per half-step. When the scalings would spread E's entries by more than
      `e^_DRIFT` (a small `ε`), the half-step is a log-domain one again. The result equals the pure
      log-domain iteration to float32 rounding. That decision reads the scalings on the host, so the
      scaling half-steps run only where that costs nothing (`SCALING_DEVICES`, the CPU) unless
      `scaling` says otherwise; elsewhere every half-step is a log-domain one.

    Args:
        cost: `(..., n, m)`, a batch of cost matrices.
        epsilon: entropic regularisation `ε > 0`.
        n_iters: number of Sinkhorn iterations (OTTER uses 5).
        total_mass: the plan's sum; `n` makes its rows sum to 1 (OTTER's targets) without another pass.
        scaling: use the scaling half-steps (True), never (False), or where they cost no host sync (None).
        check_finite: raise on a NaN / Inf cost (a host sync); the training loop checks its loss instead.
    Returns:
        The plan `Q`, `(..., n, m)`, float32, summing to `total_mass` over its last two dims.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    cost = cost.float()
    if check_finite and not torch.isfinite(torch.stack(torch.aminmax(cost))).all():  # NaN reaches both
        raise ValueError("cost contains NaN or Inf")
    n, m = cost.shape[-2:]
    # Keyed by the dim a half-step sums over: -2 fits the columns (marginal 1/m, potential g, scaling v),
    # -1 the rows (1/n, f, u). `ref` holds E's own potentials; the first half-step starts from f = log(1/n).
    marginal = {-2: 1.0 / m, -1: 1.0 / n}
    ref = {-1: torch.full(cost.shape[:-1], -math.log(n), device=cost.device), -2: None}
    scale: dict[int, Tensor | None] = {-1: None, -2: None}  # None: all ones
    spread = {-1: 0.0, -2: 0.0}  # of log u, log v
    plan = None  # E
    if scaling is None:
        scaling = cost.device.type in SCALING_DEVICES
    for step in range(2 * n_iters):
        dim, other = (-2, -1) if step % 2 == 0 else (-1, -2)
        if plan is not None and scaling:  # try the cheap half-step: a new scaling from one matrix-vector product
            new = _weighted_sums(plan, scale[other], dim).reciprocal_().mul_(marginal[dim])
            new_spread = _log_spread(new)
            if new_spread + spread[other] <= _DRIFT:  # False for inf / nan: a sum that underflowed
                scale[dim], spread[dim] = new, new_spread
                continue
        potential = ref[other] if scale[other] is None else ref[other] + scale[other].log()
        ref[dim], plan, new = _log_half_step(cost, epsilon, potential, dim, marginal[dim])
        ref[other], scale[other], scale[dim] = potential, None, new
        if scaling:
            spread = {other: 0.0, dim: _log_spread(new)}
    plan.mul_(scale[-1].mul_(total_mass).unsqueeze(-1))  # the last half-step fitted the rows: u is set
    if scale[-2] is not None:
        plan.mul_(scale[-2].unsqueeze(-2))
    return plan


def _weighted_sums(plan: Tensor, weights: Tensor | None, dim: int) -> Tensor:
    """Sums of `E` `(..., n, m)` over `dim`, the other dim weighted: `Eᵀu` (dim -2) or `Ev` (dim -1)."""
    if weights is None:
        return plan.sum(dim)
    if dim == -2:
        return (weights.unsqueeze(-2) @ plan).squeeze(-2)
    return (plan @ weights.unsqueeze(-1)).squeeze(-1)


def _log_spread(scaling: Tensor) -> float:
    """`max - min` of `log scaling`: inf or nan when a scaling overflowed or underflowed."""
    low, high = torch.aminmax(scaling)
    return (high / low).log().item()


def _log_half_step(cost: Tensor, epsilon: float, potential: Tensor, dim: int,
                   marginal: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fit the marginal over `dim` in the log domain, given the other dim's potential.

    Returns E's potential along `dim` (the max over `dim` of `-C/ε + potential`, negated), the kernel
    `E`, `(..., n, m)`, whose largest entry along `dim` is 1 so that nothing overflows, and the scaling
    along `dim` that fits the marginal.
    """
    other = -1 if dim == -2 else -2
    plan = torch.add(potential.unsqueeze(other), cost, alpha=-1.0 / epsilon)  # -C/ε + potential
    shift = plan.amax(dim, keepdim=True)
    total = plan.sub_(shift).exp_().sum(dim)
    return -shift.squeeze(dim), plan, total.reciprocal_().mul_(marginal)


@torch.no_grad()
def otter_targets(
    image_features: Tensor,
    text_features: Tensor,
    epsilon: float = LossConfig.ot_epsilon,
    n_iters: int = LossConfig.ot_iters,
    lam: float = LossConfig.ot_lambda,
    *,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """OTTER's targets: row-normalised Sinkhorn plans over the teacher's similarities (docs/methods.md §4).

    Cost `C^{I→T} = -((S_II - λI) + (S_TT - λI) + S_IT)`: the large `λ` keeps the plan off the positive
    pair, so the targets model only the *other* matches in the batch (the hard term of OTTER's loss
    covers the positive). Pass *globally gathered* features under DDP so the masked diagonal is the
    global one (the released code masks `eye(b, N)`, right only on rank 0).

    Args:
        image_features, text_features: the teacher's normalised embeddings, `(B, D)`.
        check_finite: raise on NaN / Inf similarities (a host sync; `sinkhorn`'s).
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`, rows sum to 1.
    """
    s_ii, s_tt, s_it = _similarities(image_features, text_features)
    n = s_ii.shape[0]
    negated = s_ii.add_(s_tt).neg_()  # in place (fresh tensors): each (B, B) pass counts at large B
    negated.diagonal().add_(2 * lam)
    cost = negated.new_empty(2, n, n)
    torch.sub(negated, s_it, out=cost[0])
    torch.sub(negated, cost[1].copy_(s_it.T), out=cost[1])  # a transposing copy first: see kd_targets
    # The last half-step fits the rows exactly: a plan of total mass B is row-stochastic.
    targets = sinkhorn(cost, epsilon, n_iters, total_mass=n, check_finite=check_finite)
    return targets[0], targets[1]


@torch.no_grad()
def psd_targets(
    logits: Tensor,
    alpha: float,
    subset: float = LossConfig.psd_subset,
    temperature: float = LossConfig.psd_temperature,
    generator: torch.Generator | None = None,
    hard: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Progressive self-distillation targets (docs/methods.md §5 — pdclip's *reconstruction*).

    The teacher's predictions `P = softmax_row(s / T)` (and `softmax_row(sᵀ / T)`) are mixed into the
    hard targets, `Y_i = (1 - α) e_i + α P_i`, for a random subset of a fraction `ρ` of the pairs;
    the other rows keep `e_i`. A pair in the subset gets soft targets in both directions.

    Which teacher makes `s` decides whether this distils anything: when `s` is the student's own
    detached logits and `T = 1`, the gradient of `CE(s_i, Y_i)` is `(1 - α)(softmax(s_i) - e_i)`, CLIP's
    gradient scaled down on the chosen rows, nothing more (notebook 03). `pdclip.methods.psd_teacher_logits`
    makes `s` for each `LossConfig.psd_teacher`.

    Args:
        logits: the teacher's image→text logits `s`, `(B, B)`, at the teacher's own temperature.
        alpha: the progressive weight `α_k` (`pdclip.schedules.psd_alpha`); `α = 0` gives `I`.
        subset: `ρ`, the fraction of pairs that get soft targets.
        temperature: `T_soft`; 1 keeps the teacher's temperature, > 1 softens, < 1 sharpens.
        generator: RNG for the subset (seed it identically on every rank under DDP).
        hard: symmetric `(B, B)` hard targets `e_i` stands for; `I` by default (the multi-positive
            base, docs/methods.md §8, otherwise).
    Returns:
        `(Y_i2t, Y_t2i)`, each `(B, B)`.
    """
    chosen = psd_subset(logits.shape[0], subset, generator, logits.device)
    return psd_mix(chosen, *psd_soft_rows(logits, chosen, temperature), alpha, hard)


@torch.no_grad()
def psd_mix(chosen: Tensor, soft_i2t: Tensor, soft_t2i: Tensor, alpha: float,
            hard: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`psd_targets` from its parts: `(1 - α) hard_i + α P_i` on the `chosen` rows, `hard_i` elsewhere.

    Args:
        chosen: from `psd_subset`; soft_i2t, soft_t2i: from `psd_soft_rows`.
        hard: `(B, B)`; `I` by default.
    """
    n, device = soft_i2t.shape[1], soft_i2t.device
    targets = []
    for soft in (soft_i2t, soft_t2i):
        mixed = soft.mul(alpha)  # α P_i on the chosen rows, (k, B)
        if hard is None:  # (1 - α) e_i: one entry per chosen row
            mixed[torch.arange(len(chosen), device=device), chosen] += 1 - alpha
            y = torch.eye(n, device=device, dtype=soft.dtype)
        else:
            mixed += (1 - alpha) * hard.index_select(0, chosen)
            y = hard.to(soft.dtype, copy=True)
        targets.append(y.index_copy_(0, chosen, mixed))
    return targets[0], targets[1]


def psd_subset(n: int, subset: float, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """PSD's random subset: `round(ρ n)` distinct row indices, `(k,)` int64 on `device`."""
    # The same randperm (and RNG draw) on every rank; it is n integers, so the CPU is the place for it.
    return torch.randperm(n, generator=generator)[: round(subset * n)].to(device)


@torch.no_grad()
def psd_soft_rows(logits: Tensor, chosen: Tensor, temperature: float = LossConfig.psd_temperature) -> tuple[Tensor, Tensor]:
    """The teacher's predictions on PSD's subset: what `psd_targets` mixes into `I`.

    Args:
        logits: the teacher's image→text logits `s`, `(B, B)`.
        chosen: `(k,)` row indices, from `psd_subset`.
    Returns:
        `(P_i2t, P_t2i)`: `softmax(s / T)` on the chosen rows of `s` and of `sᵀ`, each `(k, B)`.
    """
    s = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))  # half precision: softmax in fp32
    soft = []
    # Only the chosen rows of s (and of sᵀ: s's chosen columns) are soft, so only they get a softmax.
    for rows in (s.index_select(0, chosen), s.index_select(1, chosen).T):
        if temperature != 1:  # dividing by 1 changes nothing but costs a (k, B) pass
            rows = rows / temperature
        soft.append(rows.softmax(dim=-1))
    return soft[0], soft[1]
