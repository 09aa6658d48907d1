"""Multi-positive targets: identical captions share the positive mass (docs/methods.md §8)."""

import pytest
import torch

from pdclip.config import METHODS, LossConfig, TrainConfig
from pdclip.losses import clip_loss, soft_clip_loss
from pdclip.methods import method_loss
from pdclip.positives import caption_keys, duplicate_rate, image_keys, normalise_caption, positive_targets
from pdclip.train import fit

CAPTIONS = ["a view of the city", "a dog", "A  View of the City ", "a dog.", "untitled", "untitled"]


def test_normalisation_folds_case_and_whitespace_but_not_punctuation():
    assert normalise_caption("  A  View\tof the CITY ") == "a view of the city"
    assert normalise_caption("a dog") != normalise_caption("a dog.")


def test_identity_when_all_captions_are_distinct():
    keys = caption_keys([f"caption {i}" for i in range(7)])
    assert torch.equal(positive_targets(keys), torch.eye(7))


def test_rows_spread_mass_uniformly_over_identical_captions():
    y = positive_targets(caption_keys(CAPTIONS))
    torch.testing.assert_close(y.sum(-1), torch.ones(len(CAPTIONS)))
    assert y[0, 0] == y[0, 2] == 0.5 and y[2, 0] == 0.5  # the two city captions
    assert y[1, 1] == 1.0 and y[1, 3] == 0.0  # "a dog" vs "a dog.": different strings
    assert y[4, 5] == y[5, 4] == 0.5
    assert torch.equal(y, y.T)  # every group has equal rows, so the base serves both directions


def test_identical_images_are_an_option():
    images = torch.randn(4, 3, 8, 8)
    images[3] = images[1]
    keys = caption_keys(["a", "b", "c", "d"])
    assert torch.equal(positive_targets(keys), torch.eye(4))
    y = positive_targets(keys, image_keys(images))
    assert y[1, 3] == y[3, 1] == 0.5 and y[0, 0] == 1.0


def test_loss_is_invariant_to_permuting_duplicate_captions(features):
    """Swap the text embeddings of two pairs whose captions are identical: with multi-positive targets
    the loss cannot tell (both are right for both images); with CLIP's one-hot targets it can."""
    img, txt = features(len(CAPTIONS), seed=3)
    scale = torch.tensor(20.0)
    y = positive_targets(caption_keys(CAPTIONS))
    swapped = txt[[2, 1, 0, 3, 5, 4]]  # pairs 0 <-> 2 and 4 <-> 5 share a caption
    torch.testing.assert_close(soft_clip_loss(img, swapped, scale, y, y), soft_clip_loss(img, txt, scale, y, y))
    assert not torch.allclose(clip_loss(img, swapped, scale), clip_loss(img, txt, scale))


def test_duplicate_rate_counts_batches_and_rows():
    distinct = [f"c{i}" for i in range(100)]
    assert duplicate_rate(distinct, 10) == {"batches_with_duplicates": 0.0, "rows_with_duplicates": 0.0}
    same = ["untitled"] * 100
    assert duplicate_rate(same, 10) == {"batches_with_duplicates": 1.0, "rows_with_duplicates": 1.0}
    with pytest.raises(ValueError, match="fewer than batch_size"):
        duplicate_rate(distinct[:5], 10)


def _loss_and_grads(cfg, img, txt, texts):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    t_img, t_txt = img.detach().flip(0), txt.detach().flip(0)  # some teacher that is not the student
    out = method_loss(cfg, img, txt, torch.tensor(20.0), logit_scale_soft=torch.tensor(30.0),
                      teacher_image_features=t_img, teacher_text_features=t_txt,
                      teacher_logit_scale=torch.tensor(15.0), alpha=0.4, generator=torch.Generator().manual_seed(1),
                      caption_keys=caption_keys(texts))
    out.loss.backward()
    return out, img.grad, txt.grad


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_unchanged_when_captions_are_distinct(features, method):
    img, txt = features(8, seed=5)
    texts = [f"caption {i}" for i in range(8)]
    plain = _loss_and_grads(LossConfig(method=method), img, txt, texts)
    multi = _loss_and_grads(LossConfig(method=method, multi_positive=True), img, txt, texts)
    assert torch.equal(multi[0].loss, plain[0].loss)
    assert torch.equal(multi[1], plain[1]) and torch.equal(multi[2], plain[2])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_mixes_into_the_multi_positive_base(features, method):
    img, txt = features(len(CAPTIONS), seed=6)
    out, *_ = _loss_and_grads(LossConfig(method=method, multi_positive=True, ls_epsilon=0.0, psd_subset=0.0),
                              img, txt, CAPTIONS)
    base = positive_targets(caption_keys(CAPTIONS))
    for y in (out.targets_i2t, out.targets_t2i):
        torch.testing.assert_close(y.sum(-1), torch.ones(len(CAPTIONS)))
    if method in ("clip", "ls", "psd"):  # epsilon = 0, empty PSD subset: the targets are the base itself
        assert torch.equal(out.targets_i2t, base) and torch.equal(out.targets_t2i, base)
    else:  # KD / OTTER: the hard term of L = a L_hard + (1 - a) L_soft uses the base
        hard = soft_clip_loss(img, txt, torch.tensor(20.0), base, base)
        soft = soft_clip_loss(img, txt, torch.tensor(30.0), out.targets_i2t, out.targets_t2i)
        torch.testing.assert_close(out.loss, 0.5 * hard + 0.5 * soft)


@pytest.mark.parametrize("method", [*METHODS, "psd-whole-batch"])
def test_multi_positive_is_a_no_op_when_identical_captions_embed_identically(features, method):
    """A deterministic text tower gives identical captions identical embeddings. Then the rows of a
    duplicate group predict alike and the batch loss depends only on each group's summed target mass,
    which the multi-positive base leaves unchanged: loss and encoder gradients equal CLIP's targets'
    (docs/methods.md §8). PSD's random subset mixes duplicate rows with different weights and so does
    change them."""
    group = torch.tensor([0, 1, 0, 2, 3, 3])  # CAPTIONS' normalised strings: 0 <-> 2 and 4 <-> 5
    img, table = features(len(CAPTIONS), seed=7)

    def loss_and_grads(multi_positive):
        extra = {"psd_subset": 1.0} if method == "psd-whole-batch" else {}
        cfg = LossConfig(method=method.removesuffix("-whole-batch"), multi_positive=multi_positive, **extra)
        u, emb = img.clone().requires_grad_(), table.clone().requires_grad_()
        txt = emb[group]  # one embedding per distinct caption, shared by its copies
        out = method_loss(cfg, u, txt, torch.tensor(20.0), logit_scale_soft=torch.tensor(30.0),
                          teacher_image_features=u.detach().flip(0), teacher_text_features=txt.detach().flip(0),
                          teacher_logit_scale=torch.tensor(15.0), alpha=0.4,
                          generator=torch.Generator().manual_seed(1), caption_keys=caption_keys(CAPTIONS))
        return out.loss, *torch.autograd.grad(out.loss, (u, emb))

    plain, multi = loss_and_grads(False), loss_and_grads(True)
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, multi, strict=True))
    assert same == (method != "psd"), [(a - b).abs().max().item() for a, b in zip(plain, multi, strict=True)]


def test_multi_positive_needs_keys_and_positive_images_needs_multi_positive(features):
    img, txt = features(4)
    with pytest.raises(ValueError, match="multi_positive needs caption_keys"):
        method_loss(LossConfig(multi_positive=True), img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="positive_images=True needs multi_positive=True"):
        LossConfig(positive_images=True)


def test_training_with_multi_positive_runs(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=3, batch_size=16, warmup_steps=1, snapshot_every=0,
                      save_every=3, progress=False, data_kwargs={"n_train": 32, "n_eval": 16, "p_vague": 0.8},
                      loss=LossConfig(method="psd", multi_positive=True, positive_images=True))
    assert fit(cfg)["step"] == 3
