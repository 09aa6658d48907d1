import pytest
import torch
from open_clip.loss import ClipLoss

from pdclip.config import METHODS, LossConfig
from pdclip.fast import fast_symmetric_hard_ce, fast_symmetric_soft_ce, identity_soft_rows_ce, transposed
from pdclip.losses import (
    clip_loss,
    soft_clip_loss,
    soft_cross_entropy,
    symmetric_hard_ce,
    symmetric_soft_ce,
)
from pdclip.methods import method_loss
from pdclip.targets import identity_targets


@pytest.mark.parametrize("b,d", [(2, 8), (16, 32), (128, 64)])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_open_clip_forward_and_backward(features, b, d, scale):
    img, txt = features(b, d, seed=b)
    ours_in = [x.clone().requires_grad_() for x in (img, txt)]
    ref_in = [x.clone().requires_grad_() for x in (img, txt)]
    ours = clip_loss(*ours_in, torch.tensor(scale))
    ref = ClipLoss()(*ref_in, torch.tensor(scale))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    for a, r in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("b", [2, 33, 256])
def test_soft_clip_loss_with_identity_targets_equals_clip_loss(features, b):
    img, txt = features(b)
    eye = identity_targets(b)
    img_a, txt_a = (x.clone().requires_grad_() for x in (img, txt))
    img_b, txt_b = (x.clone().requires_grad_() for x in (img, txt))
    soft = soft_clip_loss(img_a, txt_a, 20.0, eye, eye)
    hard = clip_loss(img_b, txt_b, 20.0)
    (soft + hard).backward()
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(img_a.grad, img_b.grad)
    torch.testing.assert_close(txt_a.grad, txt_b.grad)


def test_soft_targets_change_the_loss(features):
    img, txt = features(8)
    uniform = torch.full((8, 8), 1 / 8)
    assert not torch.isclose(soft_clip_loss(img, txt, 10.0, uniform, uniform), clip_loss(img, txt, 10.0))


def test_logit_scale_gets_a_gradient(features):
    img, txt = features(8)
    scale = torch.tensor(10.0, requires_grad=True)
    clip_loss(img, txt, scale).backward()
    assert scale.grad is not None and scale.grad != 0


@pytest.mark.parametrize(
    "img_shape,txt_shape,message",
    [((4, 8), (4, 9), "same shape"), ((4, 8), (5, 8), "same shape"), ((1, 8), (1, 8), "B = 1"), ((8,), (8,), "2-D")],
)
def test_bad_shapes_are_named(img_shape, txt_shape, message):
    with pytest.raises(ValueError, match=message):
        clip_loss(torch.randn(img_shape), torch.randn(txt_shape), 10.0)


def test_mismatched_dtypes_are_named(features):
    img, txt = features(4)
    with pytest.raises(ValueError, match="same dtype"):
        clip_loss(img, txt.double(), 10.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_named(features, bad):
    img, txt = features(4)
    txt[2, 3] = bad
    with pytest.raises(ValueError, match="text_features contains NaN or Inf"):
        clip_loss(img, txt, 10.0)


def test_targets_that_do_not_sum_to_one_are_named(features):
    img, txt = features(4)
    eye = identity_targets(4)
    with pytest.raises(ValueError, match="rows of targets_t2i must sum to 1"):
        soft_clip_loss(img, txt, 10.0, eye, 0.5 * eye)
    with pytest.raises(ValueError, match="targets_i2t must have shape"):
        soft_clip_loss(img, txt, 10.0, identity_targets(5), eye)
    with pytest.raises(ValueError, match="negative"):
        soft_clip_loss(img, txt, 10.0, 2 * eye - torch.full((4, 4), 0.25), eye)


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("k", [0, 3, 8])
def test_identity_soft_rows_ce_equals_the_dense_soft_cross_entropy(k, own):
    """PSD's loss without its (B, B) target matrix: the same value and gradient as building it, with
    given soft rows or (`soft=None`) the logits' own detached softmax."""
    g = torch.Generator().manual_seed(k)
    logits = (5 * torch.randn(8, 8, generator=g)).requires_grad_()
    rows = torch.randperm(8, generator=g)[:k]
    for source in (logits, logits.T):  # sᵀ too, here as a non-contiguous view (PSD passes a contiguous copy)
        soft = source.detach().softmax(-1)[rows] if own else torch.randn(k, 8, generator=g).softmax(-1)
        dense = torch.eye(8)
        dense[rows] = 0.7 * dense[rows] + 0.3 * soft
        fast = identity_soft_rows_ce(source, rows, None if own else soft, 0.3)
        slow = soft_cross_entropy(source, dense)
        torch.testing.assert_close(fast, slow)
        torch.testing.assert_close(torch.autograd.grad(fast, logits, retain_graph=True)[0],
                                   torch.autograd.grad(slow, logits)[0])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # not a wrong gradient
            torch.autograd.grad(fast, logits)
    with pytest.raises(ValueError, match="square logits"):
        identity_soft_rows_ce(logits[:5], rows, soft, 0.3)


def test_transposed_is_a_contiguous_transpose_with_the_same_gradient():
    x = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    y = transposed(x)
    assert y.is_contiguous() and torch.equal(y, x.T)
    weights = torch.randn(5, 5, dtype=torch.float64)
    grad, = torch.autograd.grad((weights * y).sum(), x)
    assert grad.is_contiguous() and torch.equal(grad, weights.T)
    assert torch.autograd.gradcheck(transposed, (x,))


def test_fast_symmetric_losses_equal_the_plain_ones():
    g = torch.Generator().manual_seed(3)
    logits = (5 * torch.randn(9, 9, generator=g, dtype=torch.float64)).requires_grad_()
    y_i2t, y_t2i = (torch.randn(9, 9, generator=g, dtype=torch.float64).softmax(-1) for _ in range(2))
    for fast, plain in ((fast_symmetric_hard_ce(logits), symmetric_hard_ce(logits)),
                        (fast_symmetric_soft_ce(logits, y_i2t, y_t2i), symmetric_soft_ce(logits, y_i2t, y_t2i))):
        torch.testing.assert_close(fast, plain)
        torch.testing.assert_close(torch.autograd.grad(fast, logits)[0], torch.autograd.grad(plain, logits)[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", [{}, {"psd_teacher": "self"}, {"multi_positive": True}])
def test_fast_loss_is_the_plain_loss_for_every_method(features, method, variant):
    """`LossConfig.fast_loss` changes the arithmetic, not the loss: the same value and gradients."""
    img, txt = features(12)
    t_img, t_txt = features(12, seed=1)
    keys = {"caption_keys": torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7, 8, 9, 1])} if variant.get("multi_positive") else {}
    results = []
    for fast in (False, True):
        u, v, t = img.clone().requires_grad_(), txt.clone().requires_grad_(), torch.tensor(12.0, requires_grad=True)
        out = method_loss(LossConfig(method=method, fast_loss=fast, **variant), u, v, t,
                          logit_scale_soft=torch.tensor(20.0), teacher_image_features=t_img,
                          teacher_text_features=t_txt, teacher_logit_scale=torch.tensor(10.0), alpha=0.4,
                          generator=torch.Generator().manual_seed(0), **keys)
        results.append((out.loss.detach(), *torch.autograd.grad(out.loss, (u, v, t))))
    for plain, fast in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
