"""pdclip.data.clipart: fetch/caching, bomb handling, fixed splits, captions and classes."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from pdclip.data import build_dataset, clipart

ROOT = clipart.DEFAULT_ROOT  # where `make clipart` puts it
have_cache = all(p.exists() for p in clipart.cache_paths(ROOT, 64))
needs_cache = pytest.mark.skipif(not have_cache, reason="no clip-art cache; run `make clipart`. "
                                 + clipart.HOW_TO_GET.splitlines()[0])


def test_decode_skips_and_counts_decompression_bombs(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGBA", (100, 50), (255, 0, 0, 128)).save(path)
    pixels, status = clipart.decode((str(path), 16))
    assert status == "ok" and pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[8, 8]) == (255, 127, 127)  # half-transparent red on white
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # padding above the wide image stays white
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 5,000 px: above the warning (3,000)
    assert clipart.decode((str(path), 16)) == (None, "over_bomb_warning")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # above twice the limit: Pillow refuses
    assert clipart.decode((str(path), 16)) == (None, "over_bomb_limit")
    path.write_bytes(path.read_bytes()[:60])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**8)
    assert clipart.decode((str(path), 16)) == (None, "undecodable")


def test_fetch_reports_how_to_get_it_when_unavailable(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clipart, "find_pngs", lambda root: None)
    monkeypatch.setattr(clipart, "download", lambda root: None)
    assert clipart.main(["fetch", "--root", str(tmp_path)]) == 0
    assert "binder/apt.txt" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="apt-get"):
        clipart.ClipArt("test", root=tmp_path)


def test_captions_categories_and_split_rule():
    rel = "science/medicine/siringa_architetto_franc_01.png"
    assert clipart.caption(rel) == "siringa architetto franc 01"  # the default leaves the class name out
    assert clipart.caption(rel, category_in_caption=True) == "siringa architetto franc 01 (science, medicine)"
    assert clipart.category(rel, 1) == "science" and clipart.category(rel, 2) == "medicine"
    assert clipart.category("shapes/star.png", 2) is None
    splits = [clipart.split_of(f"x/{i}.png") for i in range(5000)]
    fractions = [splits.count(s) / 5000 for s in ("train", "val", "test")]
    assert np.allclose(fractions, [0.8, 0.1, 0.1], atol=0.02)
    assert clipart.split_of(rel) == clipart.split_of(rel)


@pytest.mark.clipart
@needs_cache
def test_fetch_is_idempotent_and_fast():
    start = time.perf_counter()
    assert clipart.fetch(ROOT)
    assert time.perf_counter() - start < 1.0


@pytest.mark.clipart
@needs_cache
def test_dataset_splits_classes_and_counts():
    parts = {s: build_dataset("clipart", s, root=ROOT, image_size=32) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in parts.items()}
    assert sizes["train"] > 5000 and 500 < sizes["val"] < 1100 and 500 < sizes["test"] < 1100
    assert not set(parts["train"].paths) & set(parts["test"].paths)
    counts = parts["test"].counts
    # Debian's package: three PNGs above Pillow's limit, more above its warning; none decoded.
    assert counts["over_bomb_limit"] >= 1 and counts["over_bomb_warning"] >= 1
    task = parts["test"].zeroshot_tasks["category"]
    assert 10 <= len(task.classnames) <= 25 and "unsorted" not in task.classnames
    assert "signs and symbols" in task.classnames
    every = torch.cat([d.labels for d in parts.values()])
    assert torch.bincount(every).min() >= 30  # tiny categories were dropped
    sample = parts["test"][0]
    assert sample["image"].shape == (3, 32, 32) and sample["label"] == int(task.labels[0])
    assert sample["index"] == 0
    # titles only: no caption names its class's folder (the zero-shot label), unless asked to
    titles = parts["test"].texts
    assert titles == [clipart.caption(p) for p in parts["test"].paths]
    labelled = clipart.ClipArt("test", root=ROOT, image_size=32, category_in_caption=True).texts
    folders = [p.split("/")[0].replace("_", " ") for p in parts["test"].paths]  # the class, at level 1
    assert all(long.startswith(f"{title} ({folder}") and long.endswith(")")
               for title, long, folder in zip(titles, labelled, folders, strict=True))
    level2 = build_dataset("clipart", "test", root=ROOT, level=2)
    assert "birds" in level2.zeroshot_tasks["category"].classnames


@needs_cache
def test_max_samples_keeps_an_evenly_spaced_subset_of_the_split():
    full = build_dataset("clipart", "test", root=ROOT, image_size=32)
    small = build_dataset("clipart", "test", root=ROOT, image_size=32, max_samples=50)
    assert len(small) == 50 and set(small.paths) <= set(full.paths)
    assert small.paths[0] == full.paths[0] and small.paths[-1] == full.paths[-1]  # spans the split
    assert small.zeroshot_tasks["category"].classnames == full.zeroshot_tasks["category"].classnames
    assert len(build_dataset("clipart", "test", root=ROOT, max_samples=10**6)) == len(full)
    with pytest.raises(ValueError, match="max_samples"):
        build_dataset("clipart", "test", root=ROOT, max_samples=0)


def test_build_cache_writes_the_kept_images_through_memory_maps(tmp_path):
    """Skipped files leave no gap and no temporary file; the cache is an ordinary .npy."""
    from PIL import Image

    from pdclip.data.clipart import build_cache, cache_paths

    png = tmp_path / "png" / "animals"
    png.mkdir(parents=True)
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40, 20 + 10 * i), colour).save(png / f"cat_{i}.png")
    (png / "broken.png").write_bytes(b"not a png")
    counts = build_cache(tmp_path / "png", tmp_path, 16, workers=1)
    assert counts["ok"] == 3 and counts["undecodable"] == 1
    images = np.load(cache_paths(tmp_path, 16)[0])
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert images[1, 8, 8].tolist() == [0, 128, 0]  # green, kept in file order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images_16px.json", "images_16px.npy", "png"]
