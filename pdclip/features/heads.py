"""`HeadsOnly`: a frozen-backbone dual encoder seen through its heads, run on cached backbone features."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdclip.features.dataset import CachedFeatures
from pdclip.features.extract import _backbone_chunks, backbones


class HeadsOnly(nn.Module):
    """A dual encoder with frozen backbones, seen through its heads: it takes backbone features.

    The encoder interface of `pdclip.models.DualEncoder` (`inputs`, `image_inputs`, `text_inputs`,
    `encode_image`, `encode_text`, `forward`, `scales`, `image_size`), so the training loop, its
    teachers and `pdclip.evaluate` run it as they run the model; its parameters are the model's (a DDP wrapper syncs the heads' gradients,
    the frozen backbones have none).

    Args:
        model: the dual encoder (kept, not copied: training it through this view trains it).
        captions: `CachedFeatures` whose caption features `text_inputs` looks up before running the
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

    def image_inputs(self, batch: dict) -> Tensor:
        """What `encode_image` takes from a cached batch (`CachedFeatures.get_batch`): backbone features `(B, F)`."""
        return batch["image_raw"]

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """What `forward` takes for a cached batch: both towers' backbone features, read from the cache."""
        return batch["image_raw"], batch["text_raw"]

    @torch.no_grad()
    def text_inputs(self, texts: list[str]) -> Tensor:
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


def cached_splits(model: nn.Module, dataset: str, splits: Iterable[str], data_kwargs: dict,
                  root: str | Path | None = None) -> tuple[HeadsOnly, dict[str, CachedFeatures]]:
    """Each split's cached backbone features and the heads-only view of `model` that reads them: what
    `pdclip.evaluate.evaluate_model` takes to score a frozen-tower model without running its backbones."""
    cached = {s: CachedFeatures(model, dataset, s, data_kwargs, root=root) for s in splits}
    return HeadsOnly(model, cached.values()), cached
