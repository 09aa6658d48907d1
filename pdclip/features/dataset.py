"""`CachedFeatures`: one dataset split's backbone features, extracted once and memory-mapped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from pdclip.data import BatchedDataset, build_dataset, collate
from pdclip.data.sampling import SeededSamples
from pdclip.features.extract import _backbone_chunks, _tower_key, backbones, shard_features, trunk_shape
from pdclip.features.store import DEFAULT_ROOT, FeatureCacheError, _digest, cached_array


class CachedFeatures(BatchedDataset):
    """The backbone features of one dataset split, extracted once and memory-mapped.

    Indexed like `pdclip.data.sampling.SeededSamples`, by `(epoch, index)` keys: `get_batch(keys)`
    gives `{"image_raw": (B, F), "text_raw": (B, F_t), "text": list[str], "index": (B,), "label": (B,)}`
    from epoch `e`'s view `e % views`, with no per-sample loading. "Features" are the frozen trunks'
    outputs (`backbone.trunk`): with trainable blocks / text layers, `image_raw` is the activation map
    `(B, C, h, w)` and `text_raw` the token states `(B, L, H)` (zero at padding, `L` the batch's
    longest caption) that the towers' `backbone.tail` takes. What the evaluation reads of a
    split besides its samples (`FROM_SOURCE`: `zeroshot_tasks`, `retrieval_captions`,
    `true_correspondence`) is the source dataset's, where it has them, so `pdclip.evaluate` reads it
    like the dataset itself (with `HeadsOnly` as the model).

    Args:
        model: a dual encoder with frozen pretrained towers (`backbones(model)` must accept it).
        dataset, split, data_kwargs: as for `pdclip.data.build_dataset` (`image_size` is the model's;
            `augment` is the cache's business: view 0 is unaugmented, views 1.. augmented).
        views: `K`, the number of image views of the split (see the `pdclip.features` docstring).
        root: the cache folder (`DEFAULT_ROOT`: `$PDCLIP_FEATURE_CACHE`, else
            `pdclip.runtime.cache_dir("features")`: a checkout's `.cache/features`).
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
            self.images, self.image_shape = [rows], trunk_shape(towers["image"], model.image_size)
        else:
            labels = self._map_style_images(dataset, split, kwargs, towers, model, views, root, device, batch_size)

        # Captions: one row per unique caption, the trunk's states padded to the split's longest caption.
        unique, text = sorted(set(self.texts)), towers["text"]
        text_key = {**_tower_key(text), "context_length": getattr(model.text, "context_length", None),
                    "dataset": dataset, "split": split, "n": len(unique), "captions_sha256": _digest(unique)}
        ids = model.tokenize(unique)
        lengths = (ids != text.pad_id).sum(1)
        self.text_shape = (ids.shape[1], -1) if text.tail_modules() else (-1,)
        self.text_lengths = lengths.numpy() if text.tail_modules() else None
        tokens = (ids[s:s + batch_size, :int(lengths[s:s + batch_size].max())] for s in range(0, len(ids), batch_size))
        rows = (_pad_tokens(chunk, ids.shape[1]) for chunk in _backbone_chunks(text, tokens, device))
        self.text_features = cached_array(root, f"{dataset}-{split}-{text_key['tower']}-captions", text_key,
                                          len(unique), rows, "caption")
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
        self.images, self.image_shape = [], trunk_shape(towers["image"], model.image_size)
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

    FROM_SOURCE = ("zeroshot_tasks", "retrieval_captions", "true_correspondence")

    def __getattr__(self, name: str):  # only for names not set on the cache itself
        if name in self.FROM_SOURCE and "source" in self.__dict__:
            return getattr(self.source, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def get_batch(self, keys: list[tuple[int, int]]) -> dict:
        """The batch of `(epoch, index)` keys (one epoch per batch, as `GlobalBatchSampler` yields)."""
        epoch = keys[0][0]
        index = np.array([i for _, i in keys], dtype=np.int64)
        if np.any((index < 0) | (index >= len(self))):
            raise IndexError(f"indices out of range for {len(self)} samples: {index[(index < 0) | (index >= len(self))][:5]}")
        rows = self.text_rows[index]
        text = self.text_features[rows].reshape(len(index), *self.text_shape)
        if self.text_lengths is not None:  # only as many token positions as the batch's longest caption
            text = text[:, :self.text_lengths[rows].max()]
        images = self.images[epoch % self.views][index].reshape(len(index), *self.image_shape)
        batch = {"image_raw": torch.from_numpy(images), "text_raw": torch.from_numpy(np.ascontiguousarray(text)),
                 "text": [self.texts[i] for i in index.tolist()], "index": torch.from_numpy(index)}
        if self.labels is not None:
            batch["label"] = self.labels[index]
        return batch

    def caption_features(self) -> dict[str, np.ndarray]:
        """`{caption: its text trunk's output}` for every caption of the split: pooled `(F_t,)`, or
        `(L, H)` over its `L` real tokens before trainable layers."""
        out = {}
        for t, r in zip(self.texts, self.text_rows.tolist(), strict=True):
            features = self.text_features[r].reshape(self.text_shape)
            out[t] = features if self.text_lengths is None else features[:self.text_lengths[r]]
        return out


def _pad_tokens(states: Tensor, length: int) -> Tensor:
    """Text trunk outputs `(b, L', H)` zero-padded to `(b, length, H)` (pooled `(b, F)` unchanged)."""
    return states if states.ndim == 2 else F.pad(states, (0, 0, 0, length - states.shape[1]))
