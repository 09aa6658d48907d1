"""Webdataset / CC3M shards: the tar layout img2dataset writes, read, written and streamed (notebook 02).

A shard is a `.tar` of samples `{key}.jpg|png`, `{key}.txt` (the caption) and `{key}.json` (url,
caption, key, status, width, height, ...). `ShardDataset` reads local paths or URLs with brace notation
(`cc3m-{00000..00331}.tar`); `write_shards` turns any source into shards, so tests and the offline demo
use the same loader as CC3M; `stream_from_hub` is the Hugging Face `datasets` route for online users.

Why plain `tarfile` and not webdataset 1.0.2: skip-and-count needs to see every member, and webdataset's
handlers either raise or drop bad samples silently; its defaults changed between releases (0.2.90 broke
older loaders, `KeyError: 'fname'`); and refusing unsafe member names is a few lines here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain, count, islice
from pathlib import Path, PurePosixPath

from PIL import Image
from torch import distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from pdclip.data.transforms import split_transform, to_uint8

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("unsafe_name", "missing_image", "missing_text", "empty_caption", "bad_image", "bad_json")


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Expand brace notation: `"a-{000..002}.tar"` -> `["a-000.tar", "a-001.tar", "a-002.tar"]`.

    Numeric ranges keep the width of their first bound; `{x,y}` lists work too; a list of specs is
    expanded item by item.
    """
    if not isinstance(spec, str):
        return [url for s in spec for url in expand_urls(s)]
    match = re.search(r"\{([^{}]*)\}", spec)
    if match is None:
        return [spec]
    head, body, tail = spec[: match.start()], match.group(1), spec[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise ValueError(f"empty brace range {{{body}}} in {spec!r}")
        options = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"cannot expand {{{body}}} in {spec!r}: use {{a..b}} or {{x,y}}")
    return [url for opt in options for url in expand_urls(head + opt + tail)]


def open_shard(url: str):
    """A readable binary stream for a local path or an http(s) URL."""
    if re.match(r"https?://", url):
        return urllib.request.urlopen(url, timeout=60)
    if "://" in url:
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path or http(s)://")
    return open(url, "rb")


def is_complete_shard(path: str | Path) -> bool:
    """Whether a local file is a finished tar: it ends in the end-of-archive marker (two zero blocks).

    A download or copy cut short ends inside a member, so it is not mistaken for a shard; downloaders
    that write to a temporary name (`.incomplete`, `.tmp`, as `write_shards` does) never match a URL.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(-1024, os.SEEK_END)
        return f.read() == bytes(1024)


def require_shards(urls: str | Iterable[str], how: str = "") -> list[str]:
    """The expanded URLs of `urls` when every local one is a complete shard; else a FileNotFoundError
    naming what is missing or incomplete, and `how` to get it. http(s) URLs are not checked."""
    expanded = expand_urls(urls)
    missing = [u for u in expanded if "://" not in u and not Path(u).is_file()]
    partial = [u for u in expanded if "://" not in u and Path(u).is_file() and not is_complete_shard(u)]
    if missing or partial:
        lines = [f"{len(missing)} of {len(expanded)} shards missing" + (f" (first: {missing[0]})" if missing else "")]
        if partial:
            lines.append(f"{len(partial)} incomplete (cut short, e.g. an interrupted download; delete and fetch "
                         f"again): {partial[:3]}")
        raise FileNotFoundError("; ".join(lines) + (f". To get them: {how}" if how else ""))
    return expanded


def is_safe(name: str) -> bool:
    """A member name is safe when relative and free of `..`: it cannot escape an extraction dir."""
    path = PurePosixPath(name)
    return not (path.is_absolute() or ".." in path.parts or name.startswith("\\") or ":" in path.parts[0])


def iter_samples(stream, stats: Counter) -> Iterator[dict[str, bytes]]:
    """Group consecutive tar members by key into `{"__key__": key, ext: bytes, ...}`.

    Unsafe names and non-file members (links, devices) are skipped and counted as "unsafe_name".
    """
    current: dict = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                continue
            if not (member.isfile() and is_safe(member.name)):
                stats["unsafe_name"] += 1
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext.lower()] = tar.extractfile(member).read()
    if current:
        yield current


def decode_sample(raw: dict[str, bytes], stats: Counter) -> tuple[Image.Image, str, dict] | None:
    """`(RGB image, caption, metadata)`, or None after counting why the sample is skipped."""
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            stats["bad_json"] += 1
            return None
    image_bytes = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
    if image_bytes is None:
        stats["missing_image"] += 1
        return None
    if "txt" not in raw and "caption" not in meta:
        stats["missing_text"] += 1
        return None
    text = (raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else str(meta["caption"])).strip()
    if not text:
        stats["empty_caption"] += 1
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # huge web images: skip, count
        try:
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            stats["bad_image"] += 1
            return None
    return image, text, meta


class ShardDataset(IterableDataset):
    """Image–caption samples from img2dataset-layout shards; bad samples are skipped and counted.

    Args:
        urls: a path/URL with brace notation, or a list of them.
        split: "train" (random shift; shard order shuffled each epoch, no sample buffer) or "val"/"test".
        image_size: output side in pixels.
        subset: stop after this many good samples in all (shared out over ranks and workers), or None.
        seed: seeds the shard order of "train".
        augment: random shifts on the images; default only for "train".

    Attributes:
        stats: `Counter` of "ok" and each of `SKIP_REASONS` over the last pass (in this process;
            DataLoader workers each count their own and log them at the end).
    """

    def __init__(self, urls: str | list[str], split: str = "train", image_size: int = 64,
                 subset: int | None = None, seed: int = 0, augment: bool | None = None) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"shards split must be train, val or test, got {split!r}")
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError("no shard URLs given")
        if subset is not None and subset < 1:
            raise ValueError(f"subset must be a positive number of samples, got {subset}")
        self.split, self.subset, self.seed, self.epoch = split, subset, seed, 0
        self.transform = split_transform(image_size, split, augment)
        self.stats: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        """Pick the shard order of an epoch (needed with DataLoader workers, which iterate copies)."""
        self.epoch = epoch

    def _my_share(self) -> tuple[list[str], int, int]:
        """This reader's shards and its slot among `rank x worker` readers, and the number of slots.

        Shards, not samples, are spread: with fewer shards than slots some readers stay idle.
        """
        urls = list(self.urls)
        if self.split == "train":
            random.Random(self.seed + self.epoch).shuffle(urls)
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        slot, slots = rank * workers + wid, world * workers
        return urls[slot::slots], slot, slots

    def _decoded(self, urls: list[str]) -> Iterator[tuple[Image.Image, str, dict]]:
        """Every good sample of `urls` in order; bad ones are counted in `self.stats`."""
        for url in urls:
            with open_shard(url) as stream:
                for raw in iter_samples(stream, self.stats):
                    decoded = decode_sample(raw, self.stats)
                    if decoded is not None:
                        yield decoded

    def shard_samples(self, url: str) -> Iterator[dict]:
        """The good samples of one shard in order, transformed, with no rank / worker split and no
        subset: what `pdclip.features.shard_features` extracts, shard by shard."""
        for image, text, meta in self._decoded([url]):
            yield {"image": self.transform(image), "text": text,
                   **({"label": meta["label"]} if isinstance(meta.get("label"), int) else {})}

    def __iter__(self) -> Iterator[dict]:
        urls, slot, slots = self._my_share()
        self.stats, self.epoch = Counter(), self.epoch + 1
        limit = None if self.subset is None else self.subset // slots + (slot < self.subset % slots)
        for image, text, meta in islice(self._decoded(urls), limit):
            sample = {"image": self.transform(image), "text": text, "index": self.stats["ok"] * slots + slot}
            if isinstance(meta.get("label"), int):
                sample["label"] = meta["label"]
            self.stats["ok"] += 1
            yield sample
        self.report()

    def report(self) -> None:
        """Log the counts of kept and skipped samples (a warning when any were skipped)."""
        skipped = {r: self.stats[r] for r in SKIP_REASONS if self.stats[r]}
        (log.warning if skipped else log.info)("shards: %d samples kept, skipped %s", self.stats["ok"], skipped or "none")


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


def stream_from_hub(data_files: str | list[str], split: str = "train", image_size: int = 64,
                    subset: int | None = None) -> Iterator[dict]:
    """The Hugging Face route: `datasets.load_dataset("webdataset", data_files=..., streaming=True)`.

    For online users, e.g. `data_files="hf://datasets/pixparse/cc3m-wds/cc3m-train-{0000..0575}.tar"`
    (brace notation is expanded here); local tars work the same. Rows without an image or with an
    empty caption are skipped and counted in the log line at the end.

    Yields:
        Sample dicts like `ShardDataset`'s.
    """
    from datasets import load_dataset  # heavy import, only on this route

    stream = load_dataset("webdataset", data_files={split: expand_urls(data_files)}, split=split, streaming=True)
    transform, stats = split_transform(image_size, split), Counter()
    for row in stream:
        image = next((row[e] for e in IMAGE_EXTS if row.get(e) is not None), None)
        text = (row.get("txt") or "").strip()
        if image is None or not text:
            stats["missing_image" if image is None else "empty_caption"] += 1
            continue
        sample = {"image": transform(image.convert("RGB")), "text": text, "index": stats["ok"]}
        if isinstance((row.get("json") or {}).get("label"), int):
            sample["label"] = row["json"]["label"]
        yield sample
        stats["ok"] += 1
        if subset is not None and stats["ok"] >= subset:
            break
    log.info("hub stream: %d samples kept, skipped %s", stats["ok"], {k: v for k, v in stats.items() if k != "ok"})
