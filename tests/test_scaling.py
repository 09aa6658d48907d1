"""Scaling up (notebook 09): the feature cache over shards, shard checks, and the GPU settings of the loop.

- `CachedFeatures` on the iterable shard reader: one file per shard keyed by path, size and mtime; the
  numbers are the frozen backbone's; adding shards reuses the done ones; a rewritten shard is re-extracted;
  `subset` keeps the first samples; training and evaluation run from it (`fit(... feature_cache=True)`).
- `require_shards` / `is_complete_shard`: missing and cut-short files stop with a message saying how to get them.
- `autocast_dtype("auto")`: fp16 (+ scaler) on a GPU that has bf16 only by emulation (a T4).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pdclip.checkpoint import load_checkpoint
from pdclip.config import TrainConfig
from pdclip.data import build_dataset
from pdclip.data.shard_writer import write_shards
from pdclip.data.shards import is_complete_shard, require_shards
from pdclip.evaluate import evaluate_model
from pdclip.features import CachedFeatures, FeatureCacheError, HeadsOnly
from pdclip.models import create_model
from pdclip.train import autocast_dtype, fit

TOWERS = {"pretrained_text": "all-MiniLM-L6-v2", "freeze_text": True, "pretrained_image": "efficientnet_lite0",
          "freeze_image": True, "image_size": 32, "head": "mlp", "head_hidden": 64, "embed_dim": 32}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pdclip-vit-tiny", **TOWERS).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 training shards of 8 synthetic pairs (32 px) and 1 held-out shard of 8."""
    root = tmp_path_factory.mktemp("shards")
    train = write_shards(build_dataset("synthetic", "train", n_train=24, image_size=32, augment=False), root, 8,
                         prefix="train")
    heldout = write_shards(build_dataset("synthetic", "val", n_eval=8, image_size=32), root, 8, prefix="heldout")
    return [str(p) for p in train], [str(p) for p in heldout]


def test_shard_cache_holds_the_backbone_features_one_file_per_shard(tmp_path, model, shards, capsys):
    train, _ = shards
    cache = CachedFeatures(model, "shards", "train", {"urls": train[:2]}, root=tmp_path)
    assert len(cache) == 16 and len(list(tmp_path.glob("*.index.json"))) == 2
    reader = build_dataset("shards", "val", urls=train[:2], image_size=32)
    samples = list(reader)
    assert cache.texts == [s["text"] for s in samples]
    batch = cache.get_batch([(0, 1), (0, 9), (3, 14)])  # rows from both shards, any epoch
    with torch.no_grad():
        images = torch.stack([samples[i]["image"] for i in (1, 9, 14)])
        torch.testing.assert_close(batch["image_raw"], model.visual.backbone(images), atol=1e-4, rtol=1e-4)
    assert batch["label"].tolist() == [samples[i]["label"] for i in (1, 9, 14)]
    capsys.readouterr()

    more = CachedFeatures(model, "shards", "train", {"urls": train}, root=tmp_path)  # one shard added
    log = capsys.readouterr().out
    assert log.count(f"extracted {train[2]}") == 1 and f"extracted {train[0]}" not in log  # the new shard only
    assert f"extracted {train[1]}" not in log and log.count("feature cache: reading") >= 2
    assert len(more) == 24
    np.testing.assert_array_equal(more.get_batch([(0, 5)])["image_raw"], cache.get_batch([(0, 5)])["image_raw"])

    first = CachedFeatures(model, "shards", "train", {"urls": train, "subset": 12}, root=tmp_path)
    assert len(first) == 12 and first.texts == more.texts[:12]
    with pytest.raises(IndexError):
        first.get_batch([(0, 12)])
    with pytest.raises(FeatureCacheError, match="one .unaugmented. view"):
        CachedFeatures(model, "shards", "train", {"urls": train}, views=2, root=tmp_path)


def test_a_rewritten_shard_is_extracted_again(tmp_path, model, shards, capsys):
    train, _ = shards
    local = [shutil.copy(u, tmp_path / os.path.basename(u)) for u in train[:2]]
    CachedFeatures(model, "shards", "train", {"urls": [str(p) for p in local]}, root=tmp_path / "cache")
    capsys.readouterr()
    shutil.copy(train[2], local[1])  # other contents under the same name: a new size / mtime key
    again = CachedFeatures(model, "shards", "train", {"urls": [str(p) for p in local]}, root=tmp_path / "cache")
    log = capsys.readouterr().out
    assert log.count("extracted") == 2 and "extracted " + str(local[0]) not in log  # shard 1 and new captions
    assert again.texts[8:] == [s["text"] for s in build_dataset("shards", "val", urls=train[2], image_size=32)]


def test_fit_and_evaluate_from_shard_features(tmp_path, shards):
    train, heldout = shards
    cfg = TrainConfig(dataset="shards", data_kwargs={"urls": train}, steps=6, batch_size=8, warmup_steps=1,
                      snapshot_every=3, snapshot_size=8, save_every=3, progress=False, precision="fp32",
                      feature_cache=True, feature_cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), **TOWERS)
    run = fit(cfg)
    assert run["step"] == 6 and os.path.isfile(run["checkpoint"])
    model, _ = load_checkpoint(run["out"])
    val = CachedFeatures(model, "shards", "val", {"urls": heldout}, root=cfg.feature_cache_dir)
    cached = evaluate_model(HeadsOnly(model, [val]), {"heldout": val}, linear_probe=False)
    towers = evaluate_model(model, {"heldout": build_dataset("shards", "val", urls=heldout, image_size=32)},
                            linear_probe=False)
    for key in ("heldout/retrieval/i2t_R@1", "heldout/retrieval/t2i_R@5"):
        assert cached[key] == pytest.approx(towers[key])


def test_missing_and_cut_short_shards_say_how_to_get_them(tmp_path, shards):
    train, _ = shards
    assert all(is_complete_shard(u) for u in train)
    assert require_shards(f"{os.path.dirname(train[0])}/train-{{00000..00002}}.tar") == train
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards missing .*To get them: run the download"):
        require_shards([train[0], str(tmp_path / "absent.tar")], how="run the download")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(train[0]).read_bytes()[:3000])  # an interrupted download
    assert not is_complete_shard(cut) and not is_complete_shard(tmp_path / "absent.tar")
    with pytest.raises(FileNotFoundError, match="1 incomplete"):
        require_shards(str(cut))
    assert require_shards("https://example.org/cc3m-{0000..0001}.tar")[1].endswith("0001.tar")  # not checked


def test_auto_precision_is_fp16_where_bf16_is_only_emulated(monkeypatch):
    """A T4 (compute capability 7.5) 'supports' bf16 by emulation; autocast must pick fp16 + the scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype("auto", torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
