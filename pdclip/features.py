"""Frozen towers, features once: a disk cache of backbone outputs, so training runs only the heads.

With both pretrained towers frozen (`create_model(..., freeze_text=True, freeze_image=True)`), each
tower's backbone gives the same `(N, F)` features at every step. `CachedFeatures` computes them once
per key and stores `<root>/<name>-<digest>.npy` (float32) beside `.json` (the full key); reads are
memory-mapped, so a run holds only the rows of its batch (Binder has about 2 GB).

The key is everything that changes the numbers:

* image features: the backbone's name and a sha256 of its state (the exact weights), the resolution,
  the dataset, every data keyword that can change images (a source's `caption_only_kwargs`, e.g. clip
  art's caption noise, are left out), the split, its size, the view, and a hash of its first image;
* text features (one row per unique caption): the text backbone's name and state hash, and a hash
  of the split's captions (so caption noise, whatever knob made it, is in the key).

A new key is a new file: a miss extracts (progress bar, then its time and images/s) and writes
atomically (tmp + `os.replace`, the `.json` last). A file whose `.json` holds another key, whose
shape is wrong, or that is truncated raises `FeatureCacheError` naming the file and the problem;
nothing stale is ever read. Delete `<root>` to start afresh.

Shards (`build_dataset("shards", ...)`, an iterable dataset with no `len`): `shard_features` extracts
each shard once, in listed order and unaugmented, into its own file keyed by the tower, the resolution
and the shard's path, size and mtime, with the shard's captions and labels in an `.index.json` beside it
(written last); a run over more shards reuses those already done, a rewritten shard is a new key, and
`subset` keeps the first samples. Training then samples the cached rows like a map-style split (epochs,
a global batch order), so every epoch after the first costs only the heads.

Views: view 0 is the unaugmented split. `views=K` adds `K - 1` augmented views (view v applies the
split's training augmentation seeded by `(v, index)`); epoch e of training reads view `e % K`. The
default `K = 1` trains on unaugmented features: every view costs one extraction.

Training (`TrainConfig.feature_cache`): batches are `{"image_raw": (B, F), "text_raw": (B, F_t),
"text", "index", "label"}` and `HeadsOnly(model)` runs only the towers' heads on them: the same
`fit` -> `method_loss` path, teacher, snapshots and checkpoints as a run through the full towers
(`fit` runs that loop on one CPU thread, see `cpu_threads`). Evaluation reads the same way: the
periodic one on the val split's cache, `python -m pdclip.evaluate --feature-cache` on each split's;
the numbers equal the full towers' (tests/test_features.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from pdclip.checkpoint import atomic_write_json
from pdclip.data import build_dataset, collate
from pdclip.data.sampling import SeededSamples
from pdclip.models import state_sha256

VERSION = 2  # part of every key: bump when extraction or the file layout changes (2: views' seeds)
DEFAULT_ROOT = Path(os.environ.get("PDCLIP_FEATURE_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "features"))


class FeatureCacheError(ValueError):
    """A cache file that cannot be trusted (other settings, wrong shape, truncated) or a model
    whose towers cannot be cached (no backbone/head split, trainable backbone)."""


def backbones(model: nn.Module) -> dict[str, nn.Module]:
    """`{"image": ..., "text": ...}`: the frozen backbones of a dual encoder's two towers.

    Raises:
        FeatureCacheError: a tower has no `backbone` + `head` split (not a pretrained tower), or its
            backbone has trainable parameters (e.g. `trainable_blocks > 0`): its features would change.
    """
    out = {}
    for kind, attr in (("image", "visual"), ("text", "text")):
        tower = getattr(model, attr)
        if not (hasattr(tower, "backbone") and hasattr(tower, "head")):
            raise FeatureCacheError(f"the feature cache needs pretrained towers with a backbone and a head; the "
                                    f"{kind} tower ({type(tower).__name__}) has none (set pretrained_{kind})")
        trainable = sum(p.numel() for p in tower.backbone.parameters() if p.requires_grad)
        if trainable:
            raise FeatureCacheError(f"the feature cache needs a frozen {kind} backbone; it has {trainable:,} trainable "
                                    "parameters (freeze it, trainable_blocks=0, or train without the cache)")
        out[kind] = tower.backbone
    return out


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tower_key(backbone: nn.Module) -> dict:
    return {"version": VERSION, "tower": getattr(backbone, "name", type(backbone).__name__),
            "weights_sha256": state_sha256(backbone)}


def cached_array(root: Path, name: str, key: dict, rows: int, chunks: Iterator[Tensor], unit: str, *,
                 quiet: bool = False) -> np.ndarray:
    """The `(rows, F)` float32 array stored under `key`, memory-mapped; extracted from `chunks` on a miss.

    Args:
        root: the cache folder; name: a readable file-name prefix (the key's digest follows it).
        key: everything the numbers depend on (JSON data, the backbone's weights included, so they
            fix `F`); it is stored in the `.json`.
        rows: `N`, the number of rows the array must have.
        chunks: `(b, F)` tensors in row order; only consumed on a miss.
        unit: what a row is ("img", "caption"), for the progress bar.
        quiet: no progress bar or timing line (the caller extracted `chunks` already and timed it).

    Raises:
        FeatureCacheError: the stored file has another key, another shape, or is truncated.
    """
    path = Path(root) / f"{name}-{_digest(key)[:16]}.npy"
    meta = path.with_suffix(".json")
    if meta.is_file():
        print(f"feature cache: reading {path}")
        return _open(path, meta, key, rows)
    print(f"feature cache miss: {'writing' if quiet else 'extracting'} {rows:,} {unit} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, out, row, tic = path.with_name(path.name + ".tmp"), None, 0, time.perf_counter()
    with tqdm(total=rows, unit=unit, desc=f"extract {name}", disable=quiet) as bar:
        for chunk in chunks:
            if out is None:  # F is known from the first chunk
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, chunk.shape[1]))
            out[row:row + len(chunk)] = chunk.float().cpu().numpy()
            row += len(chunk)
            bar.update(len(chunk))
    if row != rows:
        raise RuntimeError(f"extraction of {name} gave {row} rows, expected {rows}")
    out.flush()
    shape = out.shape
    del out
    os.replace(tmp, path)
    atomic_write_json({"key": key, "shape": list(shape), "dtype": "float32", "sha256": _file_sha256(path)},
                      meta)  # last: marks it complete
    seconds = time.perf_counter() - tic
    if not quiet:
        print(f"extracted {name}: {rows:,} {unit} in {seconds:.1f} s ({rows / seconds:.0f} {unit}/s)")
    return _open(path, meta, key, rows)


def _open(path: Path, meta: Path, key: dict, rows: int) -> np.ndarray:
    """Memory-map a finished cache file after checking its key, shape, size and content: the sha256
    in its `.json` (a same-shape file of another split or shard, copied over it, is refused). Hashing
    reads the file once per open (about a second per GB); a `.json` from before content hashes gets
    the file's hash recorded on its first open."""
    fix = f"delete {path} and {meta.name} to rebuild it"
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise FeatureCacheError(f"feature cache {meta} is corrupt ({e}); {fix}") from e
    if stored.get("key") != key:
        theirs = stored.get("key") or {}
        differ = sorted(k for k in key.keys() | theirs.keys() if key.get(k) != theirs.get(k))
        raise FeatureCacheError(f"feature cache {path} was made for other settings (its key differs in {differ}); {fix}")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # numpy: "mmap length is greater than file size" when truncated
        raise FeatureCacheError(f"feature cache {path} is truncated or corrupt ({e}); {fix}") from e
    if array.ndim != 2 or len(array) != rows or array.dtype != np.float32 or list(array.shape) != stored.get("shape"):
        raise FeatureCacheError(f"feature cache {path} holds {array.dtype} {array.shape}, expected float32 "
                                f"({rows}, F) as its .json says ({stored.get('shape')}); {fix}")
    digest = _file_sha256(path)
    if "sha256" not in stored:
        with suppress(OSError):  # a read-only shared cache: checked by shape only, as before hashes
            atomic_write_json({**stored, "sha256": digest}, meta)
    elif stored["sha256"] != digest:
        raise FeatureCacheError(f"feature cache {path} is not the file its {meta.name} describes (its sha256 "
                                f"differs: replaced or changed after it was written); {fix}")
    return array


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def _backbone_chunks(backbone: nn.Module, batches: Iterable, device: torch.device) -> Iterator[Tensor]:
    """`backbone(x)` for every input in `batches`, in eval mode (frozen BatchNorm, no dropout)."""
    was_training = backbone.training
    backbone.eval()
    try:
        for x in batches:
            yield backbone(x.to(device))
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
                features.append(backbone(batch["image"].to(device, non_blocking=True)).float().cpu().numpy())
                texts += batch["text"]
                labels += batch["label"].tolist() if "label" in batch else [None] * len(batch["text"])
                bar.update(len(batch["text"]))
    finally:
        backbone.train(was_training)
    seconds = time.perf_counter() - tic
    print(f"extracted {url}: {len(texts):,} img in {seconds:.1f} s ({len(texts) / seconds:.0f} img/s)")
    return np.concatenate(features) if features else np.zeros((0, 1), np.float32), texts, labels


class CachedFeatures:
    """The backbone features of one dataset split, extracted once and memory-mapped.

    Indexed like `pdclip.data.sampling.SeededSamples`, by `(epoch, index)` keys: `get_batch(keys)`
    gives `{"image_raw": (B, F), "text_raw": (B, F_t), "text": list[str], "index": (B,), "label": (B,)}`
    from epoch `e`'s view `e % views`, with no per-sample loading. Attributes it lacks come from the
    source dataset (`zeroshot_tasks`, `retrieval_captions`, `true_correspondence`), so
    `pdclip.evaluate` reads it like the dataset itself (with `HeadsOnly` as the model).

    Args:
        model: a dual encoder with frozen pretrained towers (`backbones(model)` must accept it).
        dataset, split, data_kwargs: as for `pdclip.data.build_dataset` (`image_size` is the model's;
            `augment` is the cache's business: view 0 is unaugmented, views 1.. augmented).
        views: `K`, the number of image views of the split (see the module docstring).
        root: the cache folder (`DEFAULT_ROOT`: the repository's `.cache/features`, or
            `$PDCLIP_FEATURE_CACHE`).
        batch_size: images / captions per backbone call while extracting.
    """

    def __init__(self, model: nn.Module, dataset: str, split: str, data_kwargs: dict | None = None, *,
                 views: int = 1, root: str | Path | None = None, batch_size: int = 64):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        towers = backbones(model)
        device = next(model.parameters()).device
        root = DEFAULT_ROOT if root is None else Path(root)
        kwargs = {k: v for k, v in (data_kwargs or {}).items() if k not in ("augment", "image_size")}
        self.source = build_dataset(dataset, split, image_size=model.image_size, augment=False, **kwargs)
        if isinstance(self.source, IterableDataset):  # shards: extracted shard by shard, no len() needed
            if views != 1:
                raise FeatureCacheError(f"the shard feature cache has one (unaugmented) view; got views={views}")
            self.views = 1
            self.texts, labels, rows = shard_features(self.source, towers["image"], model.image_size, root,
                                                      device, batch_size)
            self.images = [rows]
        else:
            labels = self._map_style_images(dataset, split, kwargs, towers, model, views, root, device, batch_size)

        # Captions: one row per unique caption.
        unique = sorted(set(self.texts))
        text_key = {**_tower_key(towers["text"]), "context_length": getattr(model.text, "context_length", None),
                    "dataset": dataset, "split": split, "n": len(unique), "captions_sha256": _digest(unique)}
        tokens = (model.tokenize(unique[s:s + batch_size]) for s in range(0, len(unique), batch_size))
        self.text_features = cached_array(root, f"{dataset}-{split}-{text_key['tower']}-captions", text_key,
                                          len(unique), _backbone_chunks(towers["text"], tokens, device), "caption")
        row = {t: i for i, t in enumerate(unique)}
        self.text_rows = np.array([row[t] for t in self.texts], dtype=np.int64)
        self.labels = None if labels is None else torch.as_tensor(labels)

    def _map_style_images(self, dataset, split, kwargs, towers, model, views, root, device, batch_size):
        """Set `texts`, `views`, `images` (one array per view) of a map-style source; return its labels."""
        texts, n = getattr(self.source, "texts", None), len(self.source)
        if texts is None:
            raise FeatureCacheError(f"the feature cache needs a map-style dataset with `.texts`; {dataset!r} has none")
        self.texts, self.views = list(texts), views

        # Images: the key leaves out knobs that only touch captions.
        caption_only = getattr(type(self.source), "caption_only_kwargs", ())
        image_kwargs = {k: v for k, v in kwargs.items() if k not in caption_only}
        first = self.source[0]["image"].contiguous().numpy().tobytes()
        image_key = {**_tower_key(towers["image"]), "image_size": model.image_size, "dataset": dataset,
                     "data_kwargs": json.loads(json.dumps(image_kwargs, sort_keys=True, default=str)),
                     "split": split, "n": n, "first_image_sha256": hashlib.sha256(first).hexdigest()}
        self.images = []
        for view in range(views):
            batches = (b["image"] for b in self._view_batches(dataset, split, kwargs, view, model.image_size, batch_size))
            name = f"{dataset}-{split}-{image_key['tower']}-{model.image_size}px-view{view}"
            self.images.append(cached_array(root, name, {**image_key, "view": view}, n,
                                            _backbone_chunks(towers["image"], batches, device), "img"))
        return getattr(self.source, "labels", None)

    def _view_batches(self, dataset: str, split: str, kwargs: dict, view: int, image_size: int,
                      batch_size: int) -> DataLoader:
        """Collated batches of view `view`: the unaugmented split, or its seeded augmentation."""
        if view == 0:
            return DataLoader(self.source, batch_size=batch_size, collate_fn=collate)
        augmented = build_dataset(dataset, split, image_size=image_size, augment=True, **kwargs)
        keys = [(view, i) for i in range(len(augmented))]
        return DataLoader(SeededSamples(augmented, seed=0), batch_size=batch_size, sampler=keys, collate_fn=collate)

    def __len__(self) -> int:
        return len(self.texts)

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def get_batch(self, keys: list[tuple[int, int]]) -> dict:
        """The batch of `(epoch, index)` keys (one epoch per batch, as `GlobalBatchSampler` yields)."""
        epoch = keys[0][0]
        index = np.array([i for _, i in keys], dtype=np.int64)
        if np.any((index < 0) | (index >= len(self))):
            raise IndexError(f"indices out of range for {len(self)} samples: {index[(index < 0) | (index >= len(self))][:5]}")
        batch = {"image_raw": torch.from_numpy(self.images[epoch % self.views][index]),
                 "text_raw": torch.from_numpy(self.text_features[self.text_rows[index]]),
                 "text": [self.texts[i] for i in index.tolist()], "index": torch.from_numpy(index)}
        if self.labels is not None:
            batch["label"] = self.labels[index]
        return batch

    def caption_features(self) -> dict[str, np.ndarray]:
        """`{caption: (F_t,) backbone features}` for every caption of the split."""
        return {t: self.text_features[r] for t, r in zip(self.texts, self.text_rows.tolist(), strict=True)}


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op CPU threads (`None`: as they are), then restore the count.

    Training on cached features leaves only the heads' small matmuls: one thread runs them in about
    10 ms a step at batch 128, while two threads on a busy shared 2-core CPU wait on each other for
    about 200 ms (measured with `frozen_cpu`, 2026-11-28).
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cached_splits(model: nn.Module, dataset: str, splits: Iterable[str], data_kwargs: dict,
                  root: str | Path | None = None) -> tuple[HeadsOnly, dict[str, CachedFeatures]]:
    """Each split's cached backbone features and the heads-only view of `model` that reads them: what
    `pdclip.evaluate.evaluate_model` takes to score a frozen-tower model without running its backbones."""
    cached = {s: CachedFeatures(model, dataset, s, data_kwargs, root=root) for s in splits}
    return HeadsOnly(model, cached.values()), cached


class HeadsOnly(nn.Module):
    """A dual encoder with frozen backbones, seen through its heads: it takes backbone features.

    The interface of `pdclip.models.DualEncoder` (`tokenize`, `encode_image`, `encode_text`,
    `forward`, `scales`, `image_size`), so the training loop, its teachers and `pdclip.evaluate` run
    it as they run the model; its parameters are the model's (a DDP wrapper syncs the heads' gradients,
    the frozen backbones have none).

    Args:
        model: the dual encoder (kept, not copied: training it through this view trains it).
        captions: `CachedFeatures` whose caption features `tokenize` looks up before running the
            frozen text backbone (zero-shot prompts, other captions: computed once, then remembered).
    """

    def __init__(self, model: nn.Module, captions: Iterable[CachedFeatures] = ()):
        super().__init__()
        backbones(model)  # checks the towers
        self.model = model
        self.known: dict[str, np.ndarray] = {}
        for c in captions:
            self.known.update(c.caption_features())

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def scales(self) -> tuple[Tensor, Tensor]:
        return self.model.scales()

    @torch.no_grad()
    def tokenize(self, texts: list[str]) -> Tensor:
        """Text backbone features `(B, F_t)` on the CPU: cached where known, else computed (and kept)."""
        missing = sorted(set(texts) - self.known.keys())
        backbone = self.model.text.backbone
        tokens = (self.model.tokenize(missing[s:s + 64]) for s in range(0, len(missing), 64))
        features = _backbone_chunks(backbone, tokens, next(backbone.parameters()).device)
        self.known.update(zip(missing, (row for chunk in features for row in chunk.cpu().numpy()), strict=True))
        return torch.from_numpy(np.stack([self.known[t] for t in texts]))

    def encode_image(self, image_raw: Tensor) -> Tensor:
        """Image backbone features `(B, F)` -> L2-normalised `(B, D)`: the image head only."""
        return F.normalize(self.model.visual.head(image_raw), dim=-1)

    def encode_text(self, text_raw: Tensor) -> Tensor:
        """Text backbone features `(B, F_t)` -> L2-normalised `(B, D)`: the text head only."""
        return F.normalize(self.model.text.head(text_raw), dim=-1)

    def forward(self, image_raw: Tensor, text_raw: Tensor) -> dict[str, Tensor]:
        """`DualEncoder.forward` on backbone features: both heads and both multipliers."""
        scale, scale_soft = self.model.scales()
        return {"image_features": self.encode_image(image_raw), "text_features": self.encode_text(text_raw),
                "logit_scale": scale, "logit_scale_soft": scale_soft}
