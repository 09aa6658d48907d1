"""`HeadsOnly`: a frozen-backbone dual encoder seen through what trains (its heads, and any trainable
blocks or layers at its backbones' ends), run on the cached outputs of the frozen trunks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from pdclip.features.dataset import CachedFeatures
from pdclip.features.extract import _backbone_chunks, backbones


class HeadsOnly(nn.Module):
    """A dual encoder with frozen backbones, seen from where its training starts: it takes the outputs
    of the backbones' frozen trunks (`CachedFeatures`) and runs the rest, the trainable blocks / text
    layers at the backbones' ends (`backbone.tail`, nothing by default) and the heads.

    The encoder interface of `pdclip.models.DualEncoder` (`inputs`, `image_inputs`, `text_inputs`,
    `encode_image`, `encode_text`, `forward`, `scales`, `image_size`), so the training loop, its
    teachers and `pdclip.evaluate` run it as they run the model; its parameters are the model's (a DDP
    wrapper syncs the trainable ones' gradients, the frozen trunks have none).

    Args:
        model: the dual encoder (kept, not copied: training it through this view trains it).
        captions: `CachedFeatures` whose caption features `text_inputs` looks up before running the
            frozen text trunk (zero-shot prompts, other captions: computed once, then remembered).
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
        """What `encode_image` takes from a cached batch (`CachedFeatures.get_batch`): the image trunk's output."""
        return batch["image_raw"]

    def inputs(self, batch: dict) -> tuple[Tensor, Tensor]:
        """What `forward` takes for a cached batch: both trunks' outputs, read from the cache."""
        return batch["image_raw"], batch["text_raw"]

    @torch.no_grad()
    def text_inputs(self, texts: list[str]) -> Tensor:
        """The text trunk's outputs on the CPU, cached where known, else computed (and kept): pooled
        `(B, F_t)`, or token states `(B, L, H)` zero-padded to the longest caption."""
        missing = sorted(set(texts) - self.known.keys())
        backbone = self.model.text.backbone
        device = next(backbone.parameters()).device
        for s in range(0, len(missing), 64):
            chunk, ids = missing[s:s + 64], self.model.tokenize(missing[s:s + 64])
            states = next(_backbone_chunks(backbone, [ids], device)).cpu().numpy()
            lengths = (ids != backbone.pad_id).sum(1).tolist()  # token states: only the real tokens kept
            self.known.update((t, row if row.ndim == 1 else row[:n]) for t, row, n in zip(chunk, states, lengths, strict=True))
        rows = [torch.tensor(self.known[t]) for t in texts]  # copies: cached rows are read-only memory maps
        return torch.stack(rows) if rows[0].ndim == 1 else pad_sequence(rows, batch_first=True)

    def encode_image(self, image_raw: Tensor) -> Tensor:
        """The image trunk's output -> L2-normalised `(B, D)`: the backbone's tail, then the image head."""
        visual = self.model.visual
        return F.normalize(visual.head(visual.backbone.tail(image_raw)), dim=-1)

    def encode_text(self, text_raw: Tensor) -> Tensor:
        """The text trunk's output -> L2-normalised `(B, D)`: the backbone's tail, then the text head."""
        text = self.model.text
        return F.normalize(text.head(text.backbone.tail(text_raw)), dim=-1)

    def forward(self, image_raw: Tensor, text_raw: Tensor) -> dict[str, Tensor]:
        """`DualEncoder.forward` on the trunks' outputs: both towers' rest and both multipliers."""
        scale, scale_soft = self.model.scales()
        return {"image_features": self.encode_image(image_raw), "text_features": self.encode_text(text_raw),
                "logit_scale": scale, "logit_scale_soft": scale_soft}


def cached_splits(model: nn.Module, dataset: str, splits: Iterable[str], data_kwargs: dict,
                  root: str | Path | None = None) -> tuple[HeadsOnly, dict[str, CachedFeatures]]:
    """Each split's cached backbone features and the heads-only view of `model` that reads them: what
    `pdclip.evaluate.evaluate_model` takes to score a frozen-tower model without running its backbones."""
    cached = {s: CachedFeatures(model, dataset, s, data_kwargs, root=root) for s in splits}
    return HeadsOnly(model, cached.values()), cached
