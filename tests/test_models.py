"""Dual encoders: shapes, normalisation, temperatures, and the pretrained sentence-encoder tower."""

import math

import pytest
import torch

from pdclip.models import PDCLIP_MODELS, create_model


@pytest.mark.parametrize("name", ["pdclip-vit-tiny", "pdclip-rn-tiny"])
def test_small_models_give_normalised_features(name):
    torch.manual_seed(0)
    model = create_model(name)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a red circle", "a blue square", "two green stars"])
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (3, 64)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)  # exponentiated, not the log
    assert out["logit_scale_soft"].item() == pytest.approx(math.exp(3.9), rel=1e-5)
    torch.testing.assert_close(model.encode_image(images), out["image_features"])


def test_scales_are_clamped():
    model = create_model("pdclip-vit-tiny", init_logit_scale=10.0, init_logit_scale_soft=-1.0)
    scale, scale_soft = model.scales()
    assert scale.item() == 100.0 and scale_soft.item() == 1.0
    model.clamp_scales_()
    assert model.logit_scale.item() == pytest.approx(math.log(100)) and model.logit_scale_soft.item() == 0.0


def test_small_configs_are_registered():
    assert {"pdclip-vit-tiny", "pdclip-rn-tiny", "pdclip-vit-small"} <= set(PDCLIP_MODELS)


def test_bad_model_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vit-huge-typo'"):
        create_model("vit-huge-typo")
    with pytest.raises(ValueError, match="freeze_text"):
        create_model("pdclip-vit-tiny", freeze_text=True)


def test_pretrained_text_tower_mean_pools_real_tokens_only():
    model = create_model("pdclip-vit-tiny", "all-MiniLM-L6-v2", freeze_text=True).eval()
    short, long = "a red circle", "two small blue squares to the left of a large green triangle"
    tokens = model.tokenize([short, long])
    assert tokens.shape[0] == 2 and (tokens[0] == model.text.hf_tokenizer.pad_token_id).any()
    alone = model.encode_text(model.tokenize([short]))
    torch.testing.assert_close(model.encode_text(tokens)[:1], alone, atol=1e-5, rtol=1e-5)  # padding is ignored
    torch.testing.assert_close(alone.norm(dim=-1), torch.ones(1))


def test_frozen_text_tower_trains_only_its_projection():
    model = create_model("pdclip-vit-tiny", "all-MiniLM-L6-v2", freeze_text=True)
    model.train()
    assert not model.text.backbone.training  # dropout stays off in a frozen encoder
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight"}
    model.encode_text(model.tokenize(["a red circle"])).sum().backward()
    assert model.text.head.weight.grad is not None
    assert all(p.grad is None for p in model.text.backbone.parameters())
