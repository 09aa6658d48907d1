"""Frozen towers, features once: a disk cache of backbone outputs, so training runs only what trains.

With both pretrained towers frozen (`create_model(..., freeze_text=True, freeze_image=True)`), each
tower's backbone gives the same `(N, F)` features at every step. `CachedFeatures` computes them once
per key and stores `<root>/<name>-<digest>.npy` (float32) beside `.json` (the full key); reads are
memory-mapped, so a run holds only the rows of its batch (Binder has about 2 GB).

Partial fine-tuning (`TrainConfig.trainable_blocks`, `trainable_text_layers`): the cache then holds
each tower's *trunk*, its output before the blocks / layers that train (`ImageBackbone.trunk`, an
`(N, C, h, w)` map; `MeanPooledEncoder.trunk`, `(N, L, H)` token states padded to the split's longest
caption), and every step runs those last blocks / layers plus the heads (`backbone.tail`). Trunk plus
tail equals the full tower's forward to 1e-5 (tests/test_partial.py).

The key is everything that changes the numbers:

* image features: the backbone's name, the cut point (how many blocks train), a sha256 of the frozen
  trunk's state (the exact weights; the trained tail is not in it), the resolution, the dataset, every
  data keyword that can change images (a source's `caption_only_kwargs`, e.g. clip art's caption
  noise, are left out), the split, its size, the view, and a hash of its first image;
* text features (one row per unique caption): the text backbone's name, cut point and trunk's state
  hash, and a hash of the split's captions (so caption noise, whatever knob made it, is in the key).

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
"text", "index", "label"}` (trunks: `(B, C, h, w)` and `(B, L, H)`, L the batch's longest caption) and
`HeadsOnly(model)` runs only the towers' tails and heads on them: the same
`fit` -> `method_loss` path, teacher, snapshots and checkpoints as a run through the full towers
(`fit` runs that loop on one CPU thread, see `pdclip.runtime.cpu_threads`). Evaluation reads the same
way: the periodic one on the val split's cache, `python -m pdclip.evaluate --feature-cache` on each
split's; the numbers equal the full towers' (tests/test_features.py).

Modules, each importing only those listed before it: `store` (the on-disk array store: `cached_array`,
the checks on load, `FeatureCacheError`, `DEFAULT_ROOT`), `extract` (the frozen backbones, the tower's
part of a key, the shard route), `dataset` (`CachedFeatures`), `heads` (`HeadsOnly`, `cached_splits`).
"""

from pdclip.features.dataset import CachedFeatures
from pdclip.features.extract import ShardRows, backbones, shard_features, shard_key
from pdclip.features.heads import HeadsOnly, cached_splits
from pdclip.features.store import DEFAULT_ROOT, VERSION, FeatureCacheError, cached_array

__all__ = ["DEFAULT_ROOT", "VERSION", "CachedFeatures", "FeatureCacheError", "HeadsOnly", "ShardRows", "backbones",
           "cached_array", "cached_splits", "shard_features", "shard_key"]
