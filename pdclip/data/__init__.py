"""Image–caption datasets behind one interface: `build_dataset(name, split, **kw)` and `collate`.

Every map-style dataset returns `{"image": FloatTensor (3, H, W), "text": str, "index": int}`
(+ `"label": int` where there is a primary class); the shard reader is iterable and yields the same
dicts. Sources: `synthetic` (rendered scenes with known ground truth), `clipart` (Debian's
OpenClipart PNGs), `shards` (img2dataset / CC3M webdataset tars) and `hf` (the same tars read through
Hugging Face `datasets`). Shard sources take their files from `urls`: `split_kwargs` gives a split the
training or the held-out shards, never the training ones as "val"/"test". Tokenisation is left to the
models: each text tower owns its tokenizer.
"""

from __future__ import annotations

from pdclip.data.base import BatchedDataset, ZeroShotTask, collate

__all__ = ["SOURCES", "SHARD_SOURCES", "SPLITS", "BatchedDataset", "ZeroShotTask", "build_dataset", "collate",
           "split_kwargs"]

SOURCES = ("synthetic", "clipart", "shards", "hf")
SHARD_SOURCES = ("shards", "hf")  # sources whose splits are files given by `urls`
SPLITS = ("train", "val", "test")


def build_dataset(name: str, split: str, **kwargs):
    """Build a dataset by source name.

    Args:
        name: one of `SOURCES`: "synthetic", "clipart", "shards" or "hf".
        split: "train", "val" or "test"; the synthetic source also has "shift" and "shift_mild"
            (distribution-shifted test splits, a strong and a mild one). The shard readers take the split's shards from `urls`
            (see `split_kwargs`).
        **kwargs: passed to the source's constructor (e.g. `image_size`, `seed`, `n_train`, `root`).
    """
    if name == "synthetic":
        from pdclip.data.synthetic import SyntheticCaptions

        return SyntheticCaptions(split=split, **kwargs)
    if name == "clipart":
        from pdclip.data.clipart import ClipArt

        return ClipArt(split=split, **kwargs)
    if name == "shards":
        from pdclip.data.shards import ShardDataset

        return ShardDataset(split=split, **kwargs)
    if name == "hf":
        from pdclip.data.shards import HubShards

        return HubShards(split=split, **kwargs)
    raise ValueError(f"unknown dataset name {name!r}; choose one of {SOURCES}")


def split_kwargs(name: str, split: str, data_kwargs: dict, train_data: str | None = None,
                 val_data: str | None = None) -> dict:
    """The `build_dataset` keywords of one split: `data_kwargs`, and for shard sources its files.

    Shards have no built-in splits: "train" reads `train_data` (or `data_kwargs["urls"]`), "val" and
    "test" read `val_data` (the training subset is not carried over).

    Raises:
        ValueError: a held-out split of a shard source without `val_data`: the training shards are
            never scored as held-out data.
    """
    if name not in SHARD_SOURCES:
        return dict(data_kwargs)
    if split == "train":
        return {**data_kwargs, **({"urls": train_data} if train_data else {})}
    if not val_data:
        raise ValueError(f"no held-out shards for the {split!r} split: pass --val-data PATTERN (e.g. "
                         "'val-{00000..00003}.tar'); the training shards are never scored as val or test")
    return {**{k: v for k, v in data_kwargs.items() if k not in ("urls", "subset")}, "urls": val_data}


__all__ = ["SHARD_SOURCES", "SOURCES", "SPLITS", "ZeroShotTask", "build_dataset", "collate", "split_kwargs"]
