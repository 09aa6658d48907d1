import math
import warnings

import numpy as np
import ot
import pytest
import torch

from pdclip.config import LossConfig
from pdclip.methods import method_loss
from pdclip.schedules import psd_alpha
from pdclip.targets import (
    identity_targets,
    kd_targets,
    label_smoothing_targets,
    otter_targets,
    psd_targets,
    sinkhorn,
)

B = 12


def all_target_makers(img, txt):
    """Every method's (Y_i2t, Y_t2i) for one batch of teacher features."""
    logits = 20.0 * img @ txt.T
    g = torch.Generator().manual_seed(0)
    return {
        "clip": (identity_targets(B),) * 2,
        "ls": (label_smoothing_targets(B, 0.1),) * 2,
        "kd": kd_targets(img, txt),
        "psd": psd_targets(logits, alpha=0.4, subset=0.5, generator=g),
        "otter": otter_targets(img, txt),
    }


def test_every_target_maker_is_row_stochastic(features):
    img, txt = features(B)
    for name, pair in all_target_makers(img, txt).items():
        for y in pair:
            assert y.shape == (B, B), name
            assert (y >= 0).all(), name
            torch.testing.assert_close(y.sum(-1), torch.ones(B), msg=name)


def test_no_gradient_flows_into_targets(features):
    img, txt = (x.requires_grad_() for x in features(B))
    for name, pair in all_target_makers(img, txt).items():
        for y in pair:
            assert not y.requires_grad, name


def test_psd_at_alpha_zero_is_the_identity(features):
    img, txt = features(B)
    y_i2t, y_t2i = psd_targets(20.0 * img @ txt.T, alpha=0.0, subset=1.0)
    assert torch.equal(y_i2t, identity_targets(B)) and torch.equal(y_t2i, identity_targets(B))


def test_psd_softens_exactly_the_chosen_subset(features):
    img, txt = features(B)
    y_i2t, _ = psd_targets(20.0 * img @ txt.T, alpha=0.5, subset=0.25, generator=torch.Generator().manual_seed(1))
    soft_rows = (y_i2t.diagonal() < 1).sum().item()
    assert soft_rows == round(0.25 * B)
    assert (y_i2t.diagonal() >= 0.5).all()  # the hard anchor keeps at least 1 - alpha


def test_psd_temperature_sharpens_the_teacher(features):
    img, txt = features(B)
    logits = 20.0 * img @ txt.T
    hot, _ = psd_targets(logits, alpha=1.0, subset=1.0, temperature=4.0)
    cold, _ = psd_targets(logits, alpha=1.0, subset=1.0, temperature=0.25)
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert entropy(cold) < entropy(hot)


def test_label_smoothing_values():
    y = label_smoothing_targets(5, 0.2)
    assert torch.allclose(y.diagonal(), torch.full((5,), 0.8))
    assert torch.allclose(y[0, 1:], torch.full((4,), 0.05))


def test_otter_puts_almost_no_mass_on_the_diagonal(features):
    img, txt = features(B)
    for y in otter_targets(img, txt):
        assert y.diagonal().max() < 1e-6


def test_kd_follows_teacher_similarity(features):
    img, txt = features(B)
    y_i2t, y_t2i = kd_targets(img, txt, tau=100.0)
    assert (y_i2t.argmax(-1) == torch.arange(B)).float().mean() > 0.9  # S_II + S_TT peak on the diagonal
    assert torch.allclose(y_t2i, kd_targets(txt, img)[0])  # swapping modalities swaps directions


def test_psd_schedule_is_progressive():
    alphas = [psd_alpha(k, 100, 0.5) for k in range(0, 101, 10)]
    assert alphas[0] == 0 and alphas[-1] == pytest.approx(0.5) and alphas == sorted(alphas)
    assert psd_alpha(0, 100, 0.5, "constant") == 0.5
    with pytest.raises(ValueError, match="psd_schedule"):
        psd_alpha(0, 10, 0.5, "step")


# ---- sinkhorn ----------------------------------------------------------------------------------------


def pot_plan(cost: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """POT's plan after exactly `n_iters` iterations (stopThr=0 never stops early; it warns, which is expected)."""
    c = cost.double().numpy()
    a = np.full(c.shape[0], 1 / c.shape[0])
    b = np.full(c.shape[1], 1 / c.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = ot.sinkhorn(a, b, c, epsilon, numItermax=n_iters, stopThr=0.0)
    return torch.from_numpy(plan)


@pytest.mark.parametrize("n_iters", [1, 5, 2000])
@pytest.mark.parametrize("shape", [(16, 16), (10, 7)])
def test_sinkhorn_matches_pot(shape, n_iters):
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(n_iters), dtype=torch.float64)
    ours = sinkhorn(cost, epsilon=0.15, n_iters=n_iters).double()
    torch.testing.assert_close(ours, pot_plan(cost, 0.15, n_iters), rtol=1e-4, atol=1e-7)


def test_sinkhorn_matches_pot_on_otter_cost(features):
    img, txt = features(16)
    s_ii, s_tt, s_it = img @ img.T, txt @ txt.T, img @ txt.T
    cost = -((s_ii - 100 * torch.eye(16)) + (s_tt - 100 * torch.eye(16)) + s_it)
    # POT's linear domain underflows on this cost, so compare where it is still finite: epsilon 0.5.
    torch.testing.assert_close(sinkhorn(cost, 0.5, 5).double(), pot_plan(cost, 0.5, 5), rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals_hold_when_converged():
    cost = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    plan = sinkhorn(cost, epsilon=0.05, n_iters=500)
    assert plan.shape == (3, 20, 20)
    torch.testing.assert_close(plan.sum(-1), torch.full((3, 20), 1 / 20))
    torch.testing.assert_close(plan.sum(-2), torch.full((3, 20), 1 / 20), atol=1e-5, rtol=1e-4)


def test_batched_sinkhorn_equals_one_at_a_time():
    cost = torch.rand(4, 9, 9, generator=torch.Generator().manual_seed(3))
    batched = sinkhorn(cost, 0.1, 5)
    for i in range(4):
        torch.testing.assert_close(batched[i], sinkhorn(cost[i], 0.1, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("epsilon", [0.01, 0.15])
def test_sinkhorn_small_epsilon_and_low_precision_stay_finite(features, dtype, epsilon):
    img, txt = features(64, dtype=dtype)
    y_i2t, y_t2i = otter_targets(img, txt, epsilon=epsilon)
    cost = -(img @ txt.T) * 300  # a cost whose exp(-C/eps) overflows in the linear domain
    plan = sinkhorn(cost, epsilon, 5)
    for y in (y_i2t, y_t2i, plan):
        assert torch.isfinite(y).all()
    torch.testing.assert_close(y_i2t.sum(-1), torch.ones(64))


def test_sinkhorn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.rand(3, 3), 0.0, 5)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(torch.rand(3, 3), 0.1, 0)
    with pytest.raises(ValueError, match="cost contains NaN"):
        sinkhorn(torch.full((3, 3), float("nan")), 0.1, 5)


# ---- method_loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["clip", "ls", "kd", "psd", "otter"])
def test_method_loss_runs_and_reports_parts(features, method):
    img, txt = (x.requires_grad_() for x in features(B))
    t_img, t_txt = features(B, seed=5)
    out = method_loss(
        LossConfig(method=method), img, txt, torch.tensor(14.0),
        logit_scale_soft=torch.tensor(49.4), teacher_image_features=t_img, teacher_text_features=t_txt,
        teacher_logit_scale=torch.tensor(10.0), alpha=0.3,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and img.grad is not None
    assert out.logits.shape == out.targets_i2t.shape == (B, B) and not out.logits.requires_grad
    assert out.parts["loss"].item() == pytest.approx(out.loss.item())  # detached: read when logged
    assert not out.parts["loss"].requires_grad


def test_clip_method_equals_clip_loss(features):
    from pdclip.losses import clip_loss

    img, txt = features(B)
    out = method_loss(LossConfig(method="clip"), img, txt, torch.tensor(14.0))
    torch.testing.assert_close(out.loss, clip_loss(img, txt, torch.tensor(14.0)))


@pytest.mark.parametrize("method", ["kd", "otter"])
def test_teacher_methods_require_a_teacher(features, method):
    img, txt = features(B)
    with pytest.raises(ValueError, match="teacher_image_features"):
        method_loss(LossConfig(method=method), img, txt, torch.tensor(14.0))


def test_loss_config_names_bad_options():
    with pytest.raises(ValueError, match="method must be one of"):
        LossConfig(method="simclr")
    with pytest.raises(ValueError, match="psd_subset"):
        LossConfig(psd_subset=1.5)


@pytest.mark.parametrize("maker", [kd_targets, otter_targets])
def test_teacher_targets_find_a_near_duplicate_pair(features, maker):
    """Pairs 0 and 1 are near-copies: the other matches in the batch that KD and OTTER model."""
    img, txt = features(B)
    norm = torch.nn.functional.normalize
    img[1], txt[1] = norm(img[0] + 0.05 * img[2], dim=0), norm(txt[0] + 0.05 * txt[2], dim=0)
    for y in maker(img, txt):
        off = y - torch.diag(y.diagonal())
        assert off[0].argmax() == 1 and off[1].argmax() == 0
        assert off[0, 1] > 0.5 * off[0].sum()  # most of the off-diagonal mass of row 0 is on its twin


# --- The optimised target makers against their plain formulas (docs/methods.md §3-4), in float64.


def plain_log_sinkhorn(cost: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """Sinkhorn in the log domain only, columns then rows per iteration, uniform marginals."""
    n, m = cost.shape
    f, g = torch.full((n,), -math.log(n), dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    k = -cost.double() / epsilon
    for _ in range(n_iters):
        g = -math.log(m) - torch.logsumexp(k + f[:, None], dim=0)
        f = -math.log(n) - torch.logsumexp(k + g[None, :], dim=1)
    return (k + f[:, None] + g[None, :]).exp()


def test_kd_targets_equal_their_formula(features):
    img, txt = features(B)
    u, v = img.double(), txt.double()
    s_ii, s_tt, s_it = u @ u.T, v @ v.T, u @ v.T
    y_i2t, y_t2i = kd_targets(img, txt, tau=7.0)
    torch.testing.assert_close(y_i2t.double(), (7.0 * (s_ii + s_tt + s_it)).softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_t2i.double(), (7.0 * (s_ii + s_tt + s_it.T)).softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.15, 0.5])
def test_otter_targets_equal_their_formula(features, epsilon):
    img, txt = features(B)
    u, v = img.double(), txt.double()
    lam, eye = 100.0, torch.eye(B, dtype=torch.float64)
    base = (u @ u.T - lam * eye) + (v @ v.T - lam * eye)
    y_i2t, y_t2i = otter_targets(img, txt, epsilon=epsilon, n_iters=5, lam=lam)
    for ours, s in ((y_i2t, u @ v.T), (y_t2i, v @ u.T)):
        plan = plain_log_sinkhorn(-(base + s), epsilon, 5)
        torch.testing.assert_close(ours.double(), B * plan, rtol=1e-4, atol=1e-6)  # rows of B × plan sum to 1


def test_sinkhorn_reenters_the_log_domain_and_still_equals_the_plain_iteration(monkeypatch):
    """At a small ε the scalings soon spread E's entries by more than e^_DRIFT, and the iteration goes
    back to a log-domain half-step: count those, and check the plan against the log-domain-only one."""
    import pdclip.targets as targets

    calls = []
    real = targets._log_half_step
    monkeypatch.setattr(targets, "_log_half_step", lambda *a: calls.append(a[3]) or real(*a))
    cost = torch.rand(24, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    epsilon, n_iters = 0.01, 20
    ours = sinkhorn(cost, epsilon, n_iters).double()
    assert len(calls) > 1, "the small-ε case should re-enter the log domain"
    torch.testing.assert_close(ours, plain_log_sinkhorn(cost, epsilon, n_iters), rtol=1e-4, atol=1e-9)


def test_defaults_are_the_configs():
    """config.py is the one home of defaults: the functions a config drives take theirs from it."""
    import inspect

    from pdclip.config import TrainConfig
    from pdclip.models import DualEncoder, create_model
    from pdclip.targets import psd_soft_rows
    from pdclip.teacher import EmaTeacher

    loss, train = LossConfig(), TrainConfig()
    expected = {kd_targets: {"tau": loss.kd_tau},
                otter_targets: {"epsilon": loss.ot_epsilon, "n_iters": loss.ot_iters, "lam": loss.ot_lambda},
                psd_targets: {"subset": loss.psd_subset, "temperature": loss.psd_temperature},
                psd_soft_rows: {"temperature": loss.psd_temperature},
                EmaTeacher.__init__: {"decay": loss.ema_decay},
                DualEncoder.__init__: {"init_logit_scale": train.init_logit_scale,
                                       "init_logit_scale_soft": train.init_logit_scale_soft},
                create_model: {name: getattr(train, name) for name in
                               ("head", "head_hidden", "init_logit_scale", "init_logit_scale_soft",
                                "trainable_blocks", "image_size", "embed_dim", "freeze_image", "freeze_text")}}
    for fn, defaults in expected.items():
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults, fn.__qualname__


@pytest.mark.parametrize("epsilon", [0.01, 0.15])
def test_sinkhorn_without_scaling_steps_is_the_log_domain_iteration(epsilon):
    """What an accelerator runs (every half-step in the log domain, no host reads) equals the plain
    iteration and the CPU's scaling path."""
    cost = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    log_only = sinkhorn(cost, epsilon, 8, scaling=False).double()
    for i in range(2):
        torch.testing.assert_close(log_only[i], plain_log_sinkhorn(cost[i], epsilon, 8), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(log_only, sinkhorn(cost, epsilon, 8, scaling=True).double(), rtol=1e-4, atol=1e-9)
