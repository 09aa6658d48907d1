"""What every source shares: the sample batch (`collate`) and the zero-shot task a labelled source exposes.

A ground floor under the sources (they import it; it imports none of them), re-exported by `pdclip.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class ZeroShotTask:
    """Class names and prompt templates for one zero-shot classification task.

    Attributes:
        classnames: one name per class, `C` of them.
        templates: prompts with one `{}` placeholder, e.g. `"a photo of a {}."`.
        labels: `(N,)` the class of each image of the dataset (its primary class for multi-label).
        multilabels: optional, per image the set of all correct classes (for hit@k).
    """

    classnames: list[str]
    templates: list[str]
    labels: Tensor
    multilabels: list[set[int]] | None = None

    def __post_init__(self) -> None:
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each template needs exactly one '{{}}' placeholder, got {bad}")
        if self.labels.dim() != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {tuple(self.labels.shape)}")

    def prompts(self, classname: str) -> list[str]:
        """All templates filled with `classname`."""
        return [t.format(classname) for t in self.templates]


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch.

    Returns:
        `{"image": (B, 3, H, W), "text": list[str], "index": LongTensor (B,)}` plus
        `"label": LongTensor (B,)` when every sample has one.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "text": [s["text"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
    if all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


class BatchedDataset(Dataset):
    """A map-style dataset that builds a whole batch from its `(epoch, index)` keys in one call
    (`pdclip.features.CachedFeatures`: one array lookup, no per-sample work). The loaders
    (`pdclip.data.sampling`, `pdclip.evaluate`) call `get_batch` instead of collating samples."""

    def get_batch(self, keys: list[tuple[int, int]]) -> dict:
        raise NotImplementedError
