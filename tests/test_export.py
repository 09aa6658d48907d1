"""pdclip.export: a trained checkpoint round-trips through open_clip's `local-dir:` loader with the same
embeddings and tokens; towers open_clip cannot express fail with a clear message."""

import json
import sys

import open_clip
import pytest
import torch
from PIL import Image

from pdclip.checkpoint import load_checkpoint
from pdclip.config import TrainConfig
from pdclip.data import build_dataset, collate
from pdclip.data.transforms import MEAN, STD
from pdclip.export import NotExportable, export, main
from pdclip.towers import BACKBONE_MEAN, BACKBONE_STD
from pdclip.train import fit

CAPTIONS = ["a red circle on the left", "two blue squares", "a"]
TOWERS = {"pretrained_text": "all-MiniLM-L6-v2", "pretrained_image": "efficientnet_lite0", "image_size": 32,
          "embed_dim": 16}


def trained(tmp_path, name: str, **overrides) -> str:
    """A checkpoint after two steps (the weights moved from their initialisation)."""
    cfg = TrainConfig(out=str(tmp_path / name), steps=2, batch_size=8, warmup_steps=0, save_every=2, snapshot_every=0,
                      data_kwargs={"n_train": 8, "n_eval": 8}, progress=False, precision="fp32", device="cpu")
    fit(cfg.with_overrides(overrides))
    return str(tmp_path / name)


def round_trip(tmp_path, run: str, pixel_space: bool = False) -> None:
    ours, _ = load_checkpoint(run)
    out = export(run, tmp_path / "exported")
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    batch = collate([build_dataset("synthetic", "val", image_size=ours.image_size, n_eval=4)[i] for i in range(4)])
    images = batch["image"]  # CLIP-normalised
    mean = (BACKBONE_MEAN,) * 3 if pixel_space else tuple(MEAN.flatten().tolist())
    assert tuple(preprocess.transforms[-1].mean) == pytest.approx(mean)  # open_clip's Normalize
    # The EfficientNet tower: the exported model's own normalisation of the same pixels.
    images_theirs = (images * STD + MEAN - BACKBONE_MEAN) / BACKBONE_STD if pixel_space else images
    ids_ours, ids_theirs = ours.tokenize(CAPTIONS), tokenizer(CAPTIONS)
    # The same ids; open_clip pads to its context length, pdclip's HF tokenizer to the longest caption.
    assert torch.equal(ids_theirs[:, :ids_ours.shape[1]], ids_ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images_theirs, normalize=True), ours.encode_image(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.encode_text(ids_theirs, normalize=True), ours.encode_text(ids_ours),
                                   rtol=1e-5, atol=1e-5)
        assert theirs.logit_scale.item() == pytest.approx(ours.logit_scale.item())


@pytest.mark.parametrize("model", ["pdclip-vit-tiny", "pdclip-rn-tiny"])
def test_from_scratch_models_round_trip(tmp_path, model):
    round_trip(tmp_path, trained(tmp_path, "run", model=model, method="otter"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may download


def test_minilm_text_tower_round_trips(tmp_path):
    round_trip(tmp_path, trained(tmp_path, "run", **TOWERS, freeze_text=True), pixel_space=True)


def test_efficientnet_with_mlp_head_round_trips(tmp_path):
    # A trainable last block and an MLP head of open_clip's width (2 x embed_dim); open_clip's text tower.
    run = trained(tmp_path, "run", pretrained_image="efficientnet_lite0", image_size=32, embed_dim=16,
                  freeze_image=True, trainable_blocks=1, head="mlp", head_hidden=32)
    round_trip(tmp_path, run, pixel_space=True)


def test_minilm_with_mlp_head_is_not_exportable(tmp_path):
    run = trained(tmp_path, "run", **TOWERS, freeze_text=True, freeze_image=True, head="mlp", head_hidden=32)
    with pytest.raises(NotExportable, match="text head is an MLP with biases"):
        export(run, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_unexpressible_image_head_names_the_fix(tmp_path, capsys):
    run = trained(tmp_path, "run", **TOWERS, freeze_text=True, freeze_image=True, head="mlp", head_hidden=24)
    with pytest.raises(SystemExit, match="--head_hidden 32"):
        main(["--checkpoint", run, "--out", str(tmp_path / "out")])


def test_clip_benchmark_scores_an_exported_model_offline(tmp_path, monkeypatch):
    """The README's command on a two-class image folder (CLIP_benchmark's imagenet-r reader, with our
    own class names and template): it loads `local-dir:` through open_clip and writes its metrics."""
    from clip_benchmark.cli import main as clip_benchmark

    out = export(trained(tmp_path, "run"), tmp_path / "exported")
    data = build_dataset("synthetic", "val", image_size=64, n_eval=4)
    for i in range(4):  # a folder per class: ImageFolder's layout
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data[i]["image"] * STD + MEAN).clamp(0, 1)
        Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"imagenet-r": ["red circle", "blue square"]}))
    (tmp_path / "templates.json").write_text(json.dumps({"imagenet-r": ["a photo of a {c}."]}))
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--model", f"local-dir:{out}", "--pretrained", "none", "--dataset", "imagenet-r",
        "--dataset_root", str(tmp_path / "images"), "--custom_classname_file", str(tmp_path / "classes.json"),
        "--custom_template_file", str(tmp_path / "templates.json"), "--output", str(tmp_path / "result.json"),
        "--batch_size", "4", "--num_workers", "0"])
    clip_benchmark()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["dataset"] == "imagenet-r" and 0.0 <= result["metrics"]["acc1"] <= 1.0
