"""Extracting backbone features: the frozen towers of a model, the tower's part of every key, and
the shard route (each shard extracted once, in order, its decoding split across DataLoader workers).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from pdclip.checkpoint import atomic_write_json
from pdclip.data import collate
from pdclip.features.store import VERSION, FeatureCacheError, _digest, cached_array
from pdclip.models import state_sha256
from pdclip.runtime import cpu_threads


def backbones(model: nn.Module) -> dict[str, nn.Module]:
    """`{"image": ..., "text": ...}`: the backbones of a dual encoder's two towers, whose frozen trunks
    the cache stores (`backbone.trunk(x)`; `backbone.tail` runs the trainable blocks or layers on it).

    Raises:
        FeatureCacheError: a tower has no `backbone` + `head` split (not a pretrained tower), or its
            backbone's trunk is not frozen (a trainable tower): its outputs would change.
    """
    out = {}
    for kind, attr in (("image", "visual"), ("text", "text")):
        tower = getattr(model, attr)
        if not (hasattr(tower, "backbone") and hasattr(tower, "head")):
            raise FeatureCacheError(f"the feature cache needs pretrained towers with a backbone and a head; the "
                                    f"{kind} tower ({type(tower).__name__}) has none (set pretrained_{kind})")
        frozen = trunk_modules(tower.backbone)
        trainable = sum(p.numel() for m in frozen for p in m.parameters() if p.requires_grad)
        if trainable or not frozen:
            raise FeatureCacheError(f"the feature cache needs a frozen {kind} backbone (trainable blocks or layers "
                                    f"at its end are fine); its trunk has {trainable:,} trainable parameters "
                                    f"(set freeze_{kind}, or train without the cache)")
        out[kind] = tower.backbone
    return out


def trunk_modules(backbone: nn.Module) -> list[nn.Module]:
    """The modules whose output a cache stores: a pretrained backbone's frozen trunk (`trunk_modules()`,
    before its trainable last blocks or layers), or the whole of any other module."""
    return backbone.trunk_modules() if hasattr(backbone, "trunk_modules") else [backbone]


def trunk(backbone: nn.Module, x: Tensor) -> Tensor:
    """What the cache stores for `x`: `backbone.trunk(x)`, or `backbone(x)` where it has no trunk/tail split."""
    return backbone.trunk(x) if hasattr(backbone, "trunk") else backbone(x)


def _tower_key(backbone: nn.Module) -> dict:
    """The backbone's part of a key: its name, the cut point and the exact weights of its trunk."""
    tail = getattr(backbone, "trainable_blocks", getattr(backbone, "trainable_layers", 0))
    return {"version": VERSION, "tower": getattr(backbone, "name", type(backbone).__name__),
            "tail": tail, "weights_sha256": state_sha256(nn.ModuleList(trunk_modules(backbone)))}


def trunk_shape(backbone: nn.Module, image_size: int) -> tuple[int, ...]:
    """The shape of an image backbone's trunk output for one image: `(F,)`, or `(C, h, w)` before
    trainable blocks (run on one blank image: the cache stores rows flat)."""
    blank = torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device)
    was_training = backbone.training
    try:
        with torch.no_grad():
            return tuple(trunk(backbone.eval(), blank).shape[1:])
    finally:
        backbone.train(was_training)


@torch.no_grad()
def _backbone_chunks(backbone: nn.Module, batches: Iterable, device: torch.device) -> Iterator[Tensor]:
    """`backbone.trunk(x)` for every input in `batches`, in eval mode (frozen BatchNorm, no dropout)."""
    was_training = backbone.training
    backbone.eval()
    try:
        for x in batches:
            yield trunk(backbone, x.to(device))
    finally:
        backbone.train(was_training)


def shard_key(url: str) -> dict:
    """What identifies a shard's contents: its URL and, for a local file, its size and mtime (a
    re-downloaded or rewritten shard gets a new key; remote shards are taken as immutable)."""
    key = {"shard": url}
    if "://" not in url:
        stat = os.stat(url)
        key.update(shard=str(Path(url).resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return key


class ShardRows:
    """Row lookups over per-shard `(n_s, F)` arrays as one `(N, F)` array: `rows[index]` for an
    int array `index` (what `CachedFeatures.get_batch` asks), `len(rows)`, `rows.shape`."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.concatenate([np.asarray(a) for a in self.arrays]).astype(dtype or np.float32, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), self.shape[1]), dtype=np.float32)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.arrays[s][index[mask] - self.starts[s]]
        return out


def shard_features(source, backbone: nn.Module, image_size: int, root: Path, device: torch.device,
                   batch_size: int = 64) -> tuple[list[str], list[int] | None, ShardRows]:
    """Image features of a `ShardDataset`, extracted once per shard: `(texts, labels, rows)`.

    Each shard (in listed order, unaugmented) gets its own `<root>/shards-<stem>-<tower>-<px>px-<digest>.npy`
    keyed by the tower's weights, the resolution and `shard_key(url)` (path, size, mtime), and an
    `.index.json` beside it holding the captions and labels of its good samples (written last: it marks
    the shard complete). Adding shards reuses the ones already extracted; a changed shard is a new key.
    The source's `subset` keeps the first `subset` samples (whole shards are extracted).
    """
    tower = _tower_key(backbone)
    texts, labels, arrays = [], [], []
    for url in source.urls:
        if source.subset is not None and len(texts) >= source.subset:
            break
        key = {**tower, "image_size": image_size, **shard_key(url)}
        name = f"shards-{Path(url.split('?')[0]).stem}-{tower['tower']}-{image_size}px"
        index_path = Path(root) / f"{name}-{_digest(key)[:16]}.index.json"
        if index_path.is_file():
            try:
                stored = json.loads(index_path.read_text())
            except json.JSONDecodeError as e:  # a write cut short outside pdclip (its own are atomic), a disk error
                raise FeatureCacheError(f"feature cache {index_path} is corrupt ({e}); delete it to extract "
                                        "the shard again") from e
            if stored.get("key") != key:
                raise FeatureCacheError(f"feature cache {index_path} was made for another shard or tower; delete it")
            shard_texts, shard_labels = stored["texts"], stored["labels"]

            def chunks(url=url):  # only run if the .npy went missing
                yield torch.from_numpy(_extract_shard(source, url, backbone, device, batch_size)[0])

            if shard_texts:
                arrays.append(cached_array(root, name, key, len(shard_texts), chunks(), "img"))
        else:
            features, shard_texts, shard_labels = _extract_shard(source, url, backbone, device, batch_size)
            if shard_texts:  # a shard with no good sample has only its index
                arrays.append(cached_array(root, name, key, len(shard_texts), iter([torch.from_numpy(features)]),
                                           "img", quiet=True))
            atomic_write_json({"key": key, "texts": shard_texts, "labels": shard_labels}, index_path)
        texts += shard_texts
        labels += shard_labels
    n = len(texts) if source.subset is None else min(len(texts), source.subset)
    if n == 0:
        raise FeatureCacheError(f"no good samples in the shards {source.urls[:3]}...")
    rows = ShardRows(arrays)
    if n < len(rows):  # the subset ends inside the last shard
        rows.shape = (n, rows.shape[1])
    return texts[:n], (None if None in labels[:n] else labels[:n]), rows


class _OneShard(IterableDataset):
    """Collated batches of one shard's good samples, in order, for a DataLoader with `batch_size=None`.

    Raw chunk `b` (samples `bB .. (b+1)B - 1`) is decoded by worker `b % workers`: each sample is decoded
    once, and the loader's round robin over the workers puts the chunks back in order. Every worker
    reads the shard's bytes (cheap beside decoding). A chunk with no good sample is `{}`, so the
    round robin stays aligned.
    """

    def __init__(self, source, url: str, batch_size: int):
        self.source, self.url, self.batch_size = source, url, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        raws = self.source.raw_samples(self.url)
        for b, chunk in enumerate(iter(lambda: list(islice(raws, self.batch_size)), [])):
            if b % workers == wid:
                samples = [s for s in (self.source.sample(raw, self.source.stats) for raw in chunk) if s is not None]
                yield collate([{**s, "index": b * self.batch_size + i} for i, s in enumerate(samples)]) if samples else {}


@torch.no_grad()
def _extract_shard(source, url: str, backbone: nn.Module, device: torch.device, batch_size: int,
                   workers: int | None = None) -> tuple[np.ndarray, list[str], list[int | None]]:
    """One pass over one shard: `(features (n, F), captions, labels)` of its good samples, in order.

    On a GPU, loader processes (`workers`, default up to 8) decode while the backbone runs; on a CPU
    the main process decodes on one thread (small image ops on a busy shared CPU run ~40x slower with
    two threads waiting on each other).
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = DataLoader(_OneShard(source, url, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda")
    features, texts, labels, tic = [], [], [], time.perf_counter()
    was_training, batches = backbone.training, iter(loader)
    backbone.eval()
    try:
        with tqdm(unit="img", desc=f"extract {Path(url).name}") as bar:
            while True:
                with cpu_threads(1 if workers == 0 and device.type == "cpu" else None):
                    batch = next(batches, None)
                if batch is None:
                    break
                if not batch:  # a chunk with no good sample
                    continue
                rows = trunk(backbone, batch["image"].to(device, non_blocking=True))
                features.append(rows.flatten(1).float().cpu().numpy())
                texts += batch["text"]
                labels += batch["label"].tolist() if "label" in batch else [None] * len(batch["text"])
                bar.update(len(batch["text"]))
    finally:
        backbone.train(was_training)
    seconds = time.perf_counter() - tic
    print(f"extracted {url}: {len(texts):,} img in {seconds:.1f} s ({len(texts) / seconds:.0f} img/s)")
    return np.concatenate(features) if features else np.zeros((0, 1), np.float32), texts, labels
