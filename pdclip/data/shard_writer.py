"""Writing webdataset / CC3M shards: any source as the tar layout img2dataset writes (notebooks 05, 09).

A shard `{prefix}-{00000..}.tar` holds samples `{key}.png|jpg`, `{key}.txt` (the caption) and `{key}.json`
(key, caption, status, width, height(, label)); `pdclip.data.shards.ShardDataset` reads them back, so tests,
benchmarks and the offline demo use the same loader as CC3M. Members get a fixed mtime (equal inputs give
byte-identical shards) and each `.tar` is moved into place once complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from itertools import chain, count, islice
from pathlib import Path

from PIL import Image

from pdclip.data.transforms import to_uint8


def write_shards(dataset, out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "shard",
                 image_format: str = "png") -> list[Path]:
    """Write any source's samples as img2dataset-layout shards `{prefix}-{00000..}.tar`.

    Images are the samples' tensors with the normalisation undone (use an eval split: no augmentation).
    Keys are `{shard:05d}{i:04d}` as img2dataset writes them; each `.tar` is written to a temporary
    name and moved into place, so a crash never leaves a truncated shard.

    Returns:
        The paths of the shards written.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, paths = iter(dataset), []
    for shard in count():
        first = next(samples, None)
        if first is None:
            break
        paths.append(out_dir / f"{prefix}-{shard:05d}.tar")
        tmp = paths[-1].with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for pos, sample in enumerate(chain([first], islice(samples, samples_per_shard - 1))):
                add_sample(tar, f"{shard:05d}{pos:04d}", sample, image_format)
        os.replace(tmp, paths[-1])
    if not paths:
        raise ValueError("write_shards got an empty dataset")
    return paths


def add_sample(tar: tarfile.TarFile, key: str, sample: dict, image_format: str) -> None:
    """Write one sample as `{key}.png|jpg`, `{key}.txt` and `{key}.json` (img2dataset's fields)."""
    pixels = to_uint8(sample["image"]).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
    meta = {"key": key, "caption": sample["text"], "status": "success", "width": pixels.shape[1],
            "height": pixels.shape[0], **({"label": int(sample["label"])} if "label" in sample else {})}
    for ext, data in ((image_format, buf.getvalue()), ("txt", sample["text"].encode()),
                      ("json", json.dumps(meta).encode())):
        add_member(tar, f"{key}.{ext}", data)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file with a fixed mtime, so equal inputs give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
