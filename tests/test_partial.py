"""Partial fine-tuning on cached trunks: the frozen part of each tower runs once (its output cached),
the last image blocks / text layers and the heads train. The cache plus the last blocks equals the
full towers' forward, training moves only what it should, and a checkpoint leaves the frozen part out."""

import math

import pytest
import torch

from pdclip.checkpoint import load_checkpoint, read_checkpoint
from pdclip.data import build_dataset, collate
from pdclip.evaluate import evaluate_model
from pdclip.features import CachedFeatures, FeatureCacheError, HeadsOnly
from pdclip.features.extract import backbones
from pdclip.models import create_model
from pdclip.towers import ImageBackbone
from pdclip.train import fit
from tests.test_features import DATA, TOWERS, cfg, losses

PARTIAL = {**TOWERS, "image_size": 64, "trainable_blocks": 2, "trainable_text_layers": 1}


@pytest.fixture(scope="module")
def partial():
    torch.manual_seed(0)
    return create_model("pdclip-vit-tiny", **PARTIAL).eval()


@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_image_trunk_plus_tail_is_the_backbone(blocks):
    backbone = ImageBackbone(freeze=True, trainable_blocks=blocks).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        full = backbone.net.forward_head(backbone.net.forward_features(images * backbone.scale + backbone.shift),
                                         pre_logits=True)
        trunk = backbone.trunk(images)
        torch.testing.assert_close(backbone.tail(trunk), full, atol=1e-5, rtol=0)
    assert trunk.shape == ((3, 1280) if blocks == 0 else (3, 192 if blocks == 2 else 320, 2, 2))


def test_cached_trunks_plus_last_blocks_equal_the_full_towers(tmp_path, partial):
    cached = CachedFeatures(partial, "synthetic", "val", DATA, root=tmp_path)
    keys = [(0, i) for i in (0, 3, 5, 9)]
    batch = cached.get_batch(keys)
    assert batch["image_raw"].shape == (4, 192, 2, 2) and batch["text_raw"].ndim == 3
    source = build_dataset("synthetic", "val", image_size=64, augment=False, **DATA)
    full = collate([source[i] for _, i in keys])
    view = HeadsOnly(partial, [cached])
    with torch.no_grad():
        torch.testing.assert_close(view.encode_image(batch["image_raw"]), partial.encode_image(full["image"]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(view.encode_text(batch["text_raw"]),
                                   partial.encode_text(partial.tokenize(full["text"])), atol=1e-5, rtol=0)
        # Captions outside the cache (zero-shot prompts) go through the trunk here, padded the same way.
        prompts = ["a photo of a red circle", "blue", full["text"][0]]
        torch.testing.assert_close(view.encode_text(view.text_inputs(prompts)),
                                   partial.encode_text(partial.tokenize(prompts)), atol=1e-5, rtol=0)
    scores = evaluate_model(view, {"val": cached}, linear_probe=False)
    images = build_dataset("synthetic", "val", image_size=64, **DATA)
    assert scores == pytest.approx(evaluate_model(partial, {"val": images}, linear_probe=False), abs=1e-5)


def test_the_key_covers_the_cut_point(tmp_path, partial):
    torch.manual_seed(0)
    heads_only = create_model("pdclip-vit-tiny", **{**PARTIAL, "trainable_blocks": 0, "trainable_text_layers": 0})
    CachedFeatures(heads_only, "synthetic", "val", DATA, root=tmp_path)
    CachedFeatures(partial, "synthetic", "val", DATA, root=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 4  # no file of one cut read for the other
    unfrozen = create_model("pdclip-vit-tiny", **{**PARTIAL, "trainable_blocks": 0, "freeze_image": False})
    with pytest.raises(FeatureCacheError, match="needs a frozen image backbone"):
        backbones(unfrozen)


def test_cached_partial_training_moves_the_last_blocks_only(tmp_path, partial):
    run = cfg(tmp_path, image_size=64, trainable_blocks=2, trainable_text_layers=1, steps=3, save_every=3,
              snapshot_every=0, method="psd", psd_teacher="ema")
    fit(run)
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    trained, _ = load_checkpoint(tmp_path / "run")
    image, text = (trained.visual.backbone, partial.visual.backbone), (trained.text.backbone, partial.text.backbone)
    assert not torch.equal(image[0].net.bn2.weight, image[1].net.bn2.weight)  # the last blocks trained
    assert torch.equal(image[0].net.conv_stem.weight, image[1].net.conv_stem.weight)  # the stem did not
    layers = [m.transformer.encoder.layer for m in text]
    assert not torch.equal(layers[0][-1].output.dense.weight, layers[1][-1].output.dense.weight)
    assert torch.equal(layers[0][0].output.dense.weight, layers[1][0].output.dense.weight)
    saved = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert not any(".conv_stem." in k or ".layer.0." in k for k in saved["model"])  # frozen: hashed, not stored
    assert any(".layer.5." in k for k in saved["model"]) and "text.backbone.transformer.embeddings." in saved["frozen"]
