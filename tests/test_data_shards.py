"""pdclip.data.shards: brace URLs, write -> read round trip, skip-and-count, unsafe names, HF route
(data order, readers and resume on img2dataset-layout shards: tests/test_shards_order.py)."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pdclip.data import build_dataset, collate
from pdclip.data.shard_writer import write_shards
from pdclip.data.shards import expand_urls, is_safe


@pytest.fixture(scope="module")
def source():
    return build_dataset("synthetic", "test", n_eval=30, image_size=32)


@pytest.fixture(scope="module")
def shard_dir(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(source, out, samples_per_shard=10)
    assert [p.name for p in paths] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    return out


def test_expand_urls():
    assert expand_urls("cc3m-{00008..00010}.tar") == ["cc3m-00008.tar", "cc3m-00009.tar", "cc3m-00010.tar"]
    assert expand_urls("s3/{a,b}-{1..2}.tar") == ["s3/a-1.tar", "s3/a-2.tar", "s3/b-1.tar", "s3/b-2.tar"]
    assert expand_urls(["x.tar", "y-{0..1}.tar"]) == ["x.tar", "y-0.tar", "y-1.tar"]
    with pytest.raises(ValueError, match="empty brace range"):
        expand_urls("a-{5..2}.tar")
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        list(build_dataset("shards", "test", urls="s3://bucket/a.tar"))


@pytest.mark.parametrize("name, safe", [("000001.jpg", True), ("dir/000001.txt", True), ("/etc/passwd", False),
                                        ("../evil.txt", False), ("a/../../b.jpg", False), ("C:/x.jpg", False)])
def test_is_safe(name, safe):
    assert is_safe(name) is safe


def test_round_trip_is_lossless(source, shard_dir):
    reader = build_dataset("shards", "test", urls=str(shard_dir / "shard-{00000..00002}.tar"), image_size=32)
    samples = list(reader)
    assert reader.stats["ok"] == 30 and sum(reader.stats.values()) == 30
    assert [s["text"] for s in samples] == source.texts
    assert all(torch.equal(s["image"], source[i]["image"]) for i, s in enumerate(samples))
    batch = collate(samples[:4])
    assert batch["label"].tolist() == source.labels[:4].tolist() and batch["image"].shape == (4, 3, 32, 32)
    with tarfile.open(shard_dir / "shard-00001.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("000010000.json"))
    assert names[:3] == ["000010000.png", "000010000.txt", "000010000.json"]
    assert meta["caption"] == source.texts[10] and meta["status"] == "success"


def test_subset_and_workers(shard_dir):
    urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    first = build_dataset("shards", "train", urls=urls, image_size=32, subset=7)
    assert len(list(first)) == 7 and first.stats["ok"] == 7
    loader = DataLoader(build_dataset("shards", "val", urls=urls, image_size=32), batch_size=4,
                        num_workers=2, collate_fn=collate)
    texts = [t for batch in loader for t in batch["text"]]
    split_subset = DataLoader(build_dataset("shards", "val", urls=urls, image_size=32, subset=9), batch_size=4,
                              num_workers=2, collate_fn=collate)
    assert sum(len(batch["text"]) for batch in split_subset) == 9  # 5 + 4 over two workers
    assert sorted(texts) == sorted(s["text"] for s in build_dataset("shards", "val", urls=urls, image_size=32))


def png_bytes(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_shard_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "bad.tar"
    members = [("good.png", png_bytes()), ("good.txt", b"a red square"),
               ("corrupt.jpg", b"\xff\xd8 not a jpeg"), ("corrupt.txt", b"broken"),
               ("notext.png", png_bytes()),
               ("empty.png", png_bytes()), ("empty.txt", b"   \n"),
               ("noimage.txt", b"a caption alone"),
               ("badjson.png", png_bytes()), ("badjson.txt", b"ok"), ("badjson.json", b"{nope"),
               ("../escape.png", png_bytes()), ("/abs.txt", b"absolute"),
               ("last.png", png_bytes((0, 0, 255))), ("last.txt", b"a blue square")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    reader = build_dataset("shards", "test", urls=str(path), image_size=8)
    with caplog.at_level("WARNING"):
        texts = [s["text"] for s in reader]
    assert texts == ["a red square", "a blue square"]
    assert dict(reader.stats) == {"ok": 2, "bad_image": 1, "missing_text": 1, "empty_caption": 1,
                                  "missing_image": 1, "bad_json": 1, "unsafe_name": 3}
    assert "2 samples kept" in caplog.text and "unsafe_name" in caplog.text


def test_write_shards_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="empty dataset"):
        write_shards([], tmp_path)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([], tmp_path, samples_per_shard=0)


def test_hugging_face_route_reads_local_tars(source, shard_dir):
    files = str(shard_dir / "shard-{00000..00002}.tar")
    samples = list(build_dataset("hf", "test", urls=files, image_size=32, subset=12))
    assert [s["text"] for s in samples] == source.texts[:12]
    assert torch.equal(samples[5]["image"], source[5]["image"]) and samples[5]["label"] == int(source.labels[5])
