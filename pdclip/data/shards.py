"""Webdataset / CC3M shards: the tar layout img2dataset writes, read and streamed (notebooks 05 and 09).

A shard is a `.tar` of samples `{key}.jpg|png`, `{key}.txt` (the caption) and `{key}.json` (url,
caption, key, status, width, height, ...). `ShardDataset` reads local paths or URLs with brace notation
(`cc3m-{00000..00331}.tar`); `pdclip.data.shard_writer.write_shards` turns any source into shards, so tests
and the offline demo use the same loader as CC3M; `HubShards` (`build_dataset("hf", ...)`) reads each shard
through Hugging Face `datasets` instead, for online users. Training order: see `ShardDataset` and
`pdclip.data.sampling.ShardBatches` (every epoch reshuffled, ranks agree, resumes exactly).

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
from itertools import islice
from pathlib import Path, PurePosixPath

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pdclip.data.sampling import AUGMENTATION, SHARD_ORDER, SHUFFLE_BUFFER, mixed_seed, seeded_torch
from pdclip.data.transforms import split_transform
from pdclip.distributed import world

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

    The stream of an epoch is a function of `(seed, epoch, reader)` only, where the readers are the
    `ranks x DataLoader workers` (`world()` is read when the dataset is built): "train" shuffles the
    shard order by `(seed, epoch)`, deals the shards out to the readers, shuffles each reader's samples
    in a buffer seeded by `(seed, epoch, reader)` and seeds each augmentation by its position, so a
    resumed run re-creates it exactly. Call `set_epoch(e)` before iterating (the training loop does);
    iterating twice without it gives the same order.

    Args:
        urls: a path/URL with brace notation, or a list of them; local files must all exist and be
            complete (`require_shards`), checked here, before anything trains.
        split: "train" (shuffled, augmented) or "val"/"test" (listed order, plain).
        image_size: output side in pixels.
        subset: keep the first `subset` good samples of the listed shards (the same ones every epoch),
            dealt out sample by sample, so any number of readers gets exactly `subset` in all; each
            reader decodes the whole subset to find its share (meant for small runs).
        seed: seeds the shard order, the shuffle buffer and the augmentation of "train".
        augment: random shifts on the images; default only for "train".
        shuffle_buffer: "train" only: samples each reader holds (raw bytes) to shuffle within; 0 off.

    Attributes:
        stats: `Counter` of "ok" and each of `SKIP_REASONS` over the last pass (in this process;
            DataLoader workers each count their own and log them at the end).
    """

    def __init__(self, urls: str | list[str], split: str = "train", image_size: int = 64,
                 subset: int | None = None, seed: int = 0, augment: bool | None = None,
                 shuffle_buffer: int = 1000) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"shards split must be train, val or test, got {split!r}")
        self.urls = require_shards(urls)
        if not self.urls:
            raise ValueError("no shard URLs given")
        if subset is not None and subset < 1:
            raise ValueError(f"subset must be a positive number of samples, got {subset}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.split, self.subset, self.seed, self.epoch = split, subset, seed, 0
        self.shuffle_buffer = shuffle_buffer if split == "train" else 0
        self.transform = split_transform(image_size, split, augment)
        self.rank, self.world_size = world()
        self.stats: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch`'s order next (DataLoader workers copy the dataset when an iterator starts)."""
        self.epoch = epoch

    def check_readers(self, num_workers: int) -> None:
        """Raise (one line) if some of the `ranks x num_workers` readers would get no shard."""
        readers = self.world_size * max(num_workers, 1)
        if self.subset is None and len(self.urls) < readers:
            raise ValueError(f"shards: {len(self.urls)} shard(s) for {readers} readers ({self.world_size} rank(s) x "
                             f"{max(num_workers, 1)} worker(s)); each reader needs a shard: use at most "
                             f"{len(self.urls)} workers x ranks, more shards, or a subset")

    def _reader(self) -> tuple[int, int]:
        """This reader's number among the `ranks x workers` readers, and their count."""
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + wid, self.world_size * workers

    def _raw(self, urls: list[str]) -> Iterator[dict[str, bytes]]:
        """The raw samples of `urls` in order (unsafe members are counted in `self.stats`)."""
        for url in urls:
            with open_shard(url) as stream:
                yield from iter_samples(stream, self.stats)

    def _decoded(self, urls: list[str]) -> Iterator[tuple[dict[str, bytes], Image.Image, str, dict]]:
        """Every good sample of `urls` in order, with its raw bytes; bad ones are counted in `self.stats`."""
        for raw in self._raw(urls):
            decoded = decode_sample(raw, self.stats)
            if decoded is not None:
                yield raw, *decoded

    def _my_raw(self, epoch: int, reader: int, readers: int) -> Iterator[dict[str, bytes]]:
        """This reader's raw samples of `epoch`, before the shuffle buffer."""
        if self.subset is not None:  # sample by sample: exact whatever the number of readers
            good = islice(self._decoded(self.urls), self.subset)
            return (raw for n, (raw, *_) in enumerate(good) if n % readers == reader)
        urls = list(self.urls)
        if self.split == "train":
            random.Random(mixed_seed(self.seed, epoch, SHARD_ORDER)).shuffle(urls)
        if len(urls) < readers:
            raise ValueError(f"shards: reader {reader} of {readers} has no shard ({len(urls)} shard(s)); "
                             "use fewer workers x ranks")
        return self._raw(urls[reader::readers])

    def stream(self, epoch: int) -> Iterator[dict]:
        """This reader's samples of `epoch`: `{"image", "text", "index", "key"(, "label")}`; `index`
        is unique within the epoch over all readers."""
        reader, readers = self._reader()
        self.stats = Counter()
        raws = self._my_raw(epoch, reader, readers)
        if self.shuffle_buffer:
            raws = shuffled(raws, self.shuffle_buffer, random.Random(mixed_seed(self.seed, epoch, SHUFFLE_BUFFER, reader)))
        counts = self.stats if self.subset is None else Counter()  # a subset's samples were counted once
        n = 0
        for raw in raws:
            with seeded_torch(mixed_seed(self.seed, epoch, AUGMENTATION, reader, n)):
                sample = self.sample(raw, counts)
            if sample is None:
                continue
            self.stats["ok"] += 1
            yield {**sample, "index": n * readers + reader, "key": raw["__key__"]}
            n += 1
        self.report()

    def __iter__(self) -> Iterator[dict]:
        return self.stream(self.epoch)

    def raw_samples(self, url: str) -> Iterator[dict[str, bytes]]:
        """One shard's raw samples in order, with no reader split and no subset (feature extraction)."""
        return self._raw([url])

    def sample(self, raw: dict[str, bytes], stats: Counter) -> dict | None:
        """A raw sample decoded and transformed, `{"image", "text"(, "label")}`, or None (counted in `stats`)."""
        decoded = decode_sample(raw, stats)
        if decoded is None:
            return None
        image, text, meta = decoded
        return {"image": self.transform(image), "text": text,
                **({"label": meta["label"]} if isinstance(meta.get("label"), int) else {})}

    def report(self) -> None:
        """Log the counts of kept and skipped samples (a warning when any were skipped)."""
        skipped = {r: self.stats[r] for r in SKIP_REASONS if self.stats[r]}
        (log.warning if skipped else log.info)("shards: %d samples kept, skipped %s", self.stats["ok"], skipped or "none")


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` in a random order through a buffer of `size`: each new item takes the place of a random
    one, which is yielded (webdataset's shuffle); the last `size` come out in random order."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class HubShards(ShardDataset):
    """The Hugging Face route (`build_dataset("hf", ...)`, `--dataset hf`): the same shard stream as
    `ShardDataset` (order, readers, subset, resume), with each shard read by
    `datasets.load_dataset("webdataset", data_files=url, streaming=True)`.

    For online users, e.g. `urls="hf://datasets/pixparse/cc3m-wds/cc3m-train-{0000..0575}.tar"`
    (brace notation is expanded here); local tars work the same. Every image column is declared
    up front and kept as bytes: `datasets` infers columns from a shard's first 5 samples, and raises
    on (or drops) samples whose image type differs, as in img2dataset shards mixing `.jpg` and `.png`.
    Decoding and skip-and-count are `ShardDataset`'s.
    """

    def _raw(self, urls: list[str]) -> Iterator[dict[str, bytes]]:
        import datasets  # heavy import, only on this route

        features = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                                      "txt": datasets.Value("string"), "json": datasets.Json(),
                                      **{ext: datasets.Image(decode=False) for ext in IMAGE_EXTS}})
        for url in urls:
            rows = datasets.load_dataset("webdataset", data_files={"train": [url]}, split="train", streaming=True,
                                         features=features)
            for row in rows:
                raw = {"__key__": row["__key__"], **{e: row[e]["bytes"] for e in IMAGE_EXTS if row.get(e)}}
                if row.get("txt") is not None:
                    raw["txt"] = row["txt"].encode()
                if row.get("json") is not None:
                    raw["json"] = json.dumps(row["json"]).encode()
                yield raw
