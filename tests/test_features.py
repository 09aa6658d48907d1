"""pdclip.features: the backbone feature cache (hits, misses, invalidation, bad files), training and
evaluation from it (equal to the full towers), partial unfreezing, and clip art's caption noise."""

import json
import math

import numpy as np
import pytest
import torch

from pdclip.checkpoint import load_checkpoint
from pdclip.config import METHODS, TrainConfig
from pdclip.data import build_dataset, clipart
from pdclip.data.sampling import SeededSamples
from pdclip.data.synthetic import SyntheticCaptions
from pdclip.evaluate import evaluate_model
from pdclip.features import CachedFeatures, FeatureCacheError, HeadsOnly
from pdclip.models import create_model
from pdclip.train import fit

TOWERS = {"pretrained_text": "all-MiniLM-L6-v2", "freeze_text": True, "pretrained_image": "efficientnet_lite0",
          "freeze_image": True, "image_size": 32, "head": "mlp", "head_hidden": 64, "embed_dim": 32}
DATA = {"n_train": 16, "n_eval": 16}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pdclip-vit-tiny", **TOWERS).eval()


def cfg(tmp_path, name="run", **overrides) -> TrainConfig:
    """Frozen Lite0 + MiniLM on 16 synthetic pairs at 32 px, batch 8: seconds per run."""
    base = TrainConfig(out=str(tmp_path / name), steps=4, batch_size=8, warmup_steps=1, data_kwargs=DATA,
                       snapshot_every=2, snapshot_size=8, save_every=2, progress=False, precision="fp32",
                       feature_cache=True, feature_cache_dir=str(tmp_path / "cache"), **TOWERS)
    return base.with_overrides(overrides)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_hit_miss_and_invalidation(tmp_path, model, capsys, monkeypatch):
    first = CachedFeatures(model, "synthetic", "train", DATA, root=tmp_path)
    assert capsys.readouterr().out.count("feature cache miss") == 2  # images and captions
    again = CachedFeatures(model, "synthetic", "train", DATA, root=tmp_path)
    out = capsys.readouterr().out
    assert "cache miss" not in out and out.count("feature cache: reading") == 2
    assert len(list(tmp_path.glob("*.npy"))) == 2
    np.testing.assert_array_equal(first.images[0], again.images[0])
    # The cache holds what the frozen backbones give (view 0: unaugmented images).
    batch = again.get_batch([(0, 3), (0, 5)])
    source = build_dataset("synthetic", "train", image_size=32, augment=False, **DATA)
    with torch.no_grad():
        images = torch.stack([source[3]["image"], source[5]["image"]])
        torch.testing.assert_close(batch["image_raw"], model.visual.backbone(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batch["text_raw"], model.text.backbone(model.tokenize(batch["text"])))

    monkeypatch.setattr(model, "image_size", 40)  # another resolution: new image features only
    CachedFeatures(model, "synthetic", "train", DATA, root=tmp_path)
    assert capsys.readouterr().out.count("feature cache miss") == 1 and len(list(tmp_path.glob("*.npy"))) == 3
    monkeypatch.undo()
    weight = next(model.text.backbone.parameters())
    with torch.no_grad():  # other weights of the text tower: new caption features only
        weight[0, 0] += 1.0
        try:
            CachedFeatures(model, "synthetic", "train", DATA, root=tmp_path)
        finally:
            weight[0, 0] -= 1.0
    assert capsys.readouterr().out.count("feature cache miss") == 1 and len(list(tmp_path.glob("*.npy"))) == 4
    # A knob that only touches captions leaves the image features' key alone.
    monkeypatch.setattr(SyntheticCaptions, "caption_only_kwargs", ("p_mismatch",), raising=False)
    CachedFeatures(model, "synthetic", "train", {**DATA, "p_mismatch": 0.5}, root=tmp_path)
    assert capsys.readouterr().out.count("feature cache miss") == 1  # captions only


def test_foreign_or_truncated_cache_raises(tmp_path, model):
    CachedFeatures(model, "synthetic", "val", DATA, root=tmp_path)
    image_file = next(tmp_path.glob("*view0*.npy"))
    caption_meta = next(tmp_path.glob("*captions*.json"))
    image_file.write_bytes(image_file.read_bytes()[:-100])
    with pytest.raises(FeatureCacheError, match=r"truncated or corrupt.*delete"):
        CachedFeatures(model, "synthetic", "val", DATA, root=tmp_path)
    image_file.unlink()
    image_file.with_suffix(".json").unlink()  # rebuilt now; then a foreign key under the caption file
    meta = json.loads(caption_meta.read_text())
    meta["key"]["weights_sha256"] = "0" * 64
    caption_meta.write_text(json.dumps(meta))
    with pytest.raises(FeatureCacheError, match=r"other settings.*weights_sha256"):
        CachedFeatures(model, "synthetic", "val", DATA, root=tmp_path)
    with pytest.raises(ValueError, match="feature_cache needs both pretrained towers frozen"):
        cfg(tmp_path, freeze_image=False)


def test_augmented_views_are_seeded_and_read_by_epoch(tmp_path, model):
    features = CachedFeatures(model, "synthetic", "train", DATA, views=2, root=tmp_path)
    augmented = SeededSamples(build_dataset("synthetic", "train", image_size=32, augment=True, **DATA), seed=0)
    plain, view1, epoch2 = (features.get_batch([(e, 4)])["image_raw"] for e in (0, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(view1, model.visual.backbone(augmented[(1, 4)]["image"][None]), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, view1) and torch.equal(plain, epoch2)  # epoch e reads view e % 2


def test_cached_training_equals_the_towers_and_resumes_exactly(tmp_path):
    # Same batches (unaugmented), same init: only where the backbones run differs. OTTER: teacher too.
    opts = {"method": "otter", "steps": 4, "save_every": 2}
    fit(cfg(tmp_path, "cached", **opts))
    fit(cfg(tmp_path, "towers", feature_cache=False, data_kwargs={**DATA, "augment": False}, **opts))
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "towers"), abs=1e-5, rel=0)
    snaps = sorted((tmp_path / "cached" / "snapshots").glob("*.pt"))
    assert [p.name for p in snaps] == [f"step_{k:06d}.pt" for k in (0, 2, 4)]

    def kill_at_step_3(model, step):
        if step == 3:  # the last checkpoint is step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg(tmp_path, "killed", eval_every=3, **opts), eval_fn=kill_at_step_3)
    fit(cfg(tmp_path, "killed", resume=True, **opts))
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "cached"), abs=1e-6, rel=0)


def test_checkpoints_leave_out_the_frozen_backbones_and_check_their_hash(tmp_path, monkeypatch):
    """A frozen Lite0 + MiniLM pair is ~110 MB that never changes: a checkpoint holds the heads (and
    the teacher's), the backbones' hashes, and loads back into the same model, or refuses if they differ."""
    fit(cfg(tmp_path, method="otter", steps=2, save_every=2))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["frozen"]) == {"visual.backbone.", "text.backbone."}
    saved = [k for k in (*ckpt["model"], *ckpt["teacher"]["module"]) if ".backbone." in k]
    assert not saved and (tmp_path / "run" / "checkpoint.pt").stat().st_size < 5e6
    model, _ = load_checkpoint(tmp_path / "run")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    ckpt["frozen"]["visual.backbone."] = "0" * 64  # weights of another package version
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="frozen visual.backbone whose weights differ"):
        load_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_from_the_cache(tmp_path, method):
    # The whole training set in every batch: the loss falls whatever the order.
    summary = fit(cfg(tmp_path, method=method, batch_size=16, lr=3e-3, snapshot_every=0, save_every=0))
    values = losses(tmp_path / "run")
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0], values
    assert summary["step"] == 4


def test_evaluation_from_cache_equals_full_towers(tmp_path, model):
    data = {**DATA, "n_shapes": 2, "n_colours": 2}  # few zero-shot prompts to encode
    cached = CachedFeatures(model, "synthetic", "val", data, root=tmp_path)
    images = build_dataset("synthetic", "val", image_size=32, **data)
    full = evaluate_model(model, {"val": images}, linear_probe=False)
    from_cache = evaluate_model(HeadsOnly(model, [cached]), {"val": cached}, linear_probe=False)
    assert from_cache.keys() == full.keys()
    assert from_cache == pytest.approx(full, abs=1e-6)


def test_partial_unfreezing_trains_without_the_cache(tmp_path):
    run = cfg(tmp_path, feature_cache=False, trainable_blocks=1, pretrained_lr_scale=0.1, steps=3,
              snapshot_every=0, save_every=0)
    fit(run)
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    trained, _ = load_checkpoint(tmp_path / "run")
    torch.manual_seed(0)
    fresh = create_model("pdclip-vit-tiny", **TOWERS, trainable_blocks=1)
    last, first = fresh.visual.backbone.net.bn2.weight, fresh.visual.backbone.net.conv_stem.weight
    assert not torch.equal(trained.visual.backbone.net.bn2.weight, last)  # the last block trained
    assert torch.equal(trained.visual.backbone.net.conv_stem.weight, first)  # the stem stayed


ROOT = clipart.DEFAULT_ROOT
needs_clipart = pytest.mark.skipif(not all(p.exists() for p in clipart.cache_paths(ROOT, 64)),
                                   reason="no clip-art cache; run `make clipart`")


@pytest.mark.clipart
@needs_clipart
def test_clipart_caption_noise_touches_training_captions_only():
    clean = clipart.ClipArt("train")
    noisy = clipart.ClipArt("train", caption_noise=0.2, noise_seed=1)
    assert noisy.mismatched.mean() == pytest.approx(0.2, abs=0.02)
    changed = np.array([a != b for a, b in zip(clean.texts, noisy.texts, strict=True)])
    assert not changed[~noisy.mismatched].any() and changed[noisy.mismatched].mean() > 0.99
    assert noisy.texts == clipart.ClipArt("train", caption_noise=0.2, noise_seed=1).texts  # seeded
    assert noisy.texts != clipart.ClipArt("train", caption_noise=0.2, noise_seed=2).texts
    assert set(noisy.texts) <= set(clean.texts)  # captions moved, none invented
    for split in ("val", "test"):  # evaluation is the same whatever the knob
        assert clipart.ClipArt(split, caption_noise=0.5).texts == clipart.ClipArt(split).texts
    with pytest.raises(ValueError, match="caption_noise"):
        clipart.ClipArt("train", caption_noise=1.5)
