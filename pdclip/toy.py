"""A toy alignment problem that trains in seconds on a CPU: notebook 03's collapse demonstration.

`toy_pairs(...)` draws image/caption *feature* pairs from a few concepts (captions live in another,
linearly mixed space); `train_toy(loss_fn, pairs, steps)` trains two small MLP encoders on them with
any loss and scores the result on every pair: R@1 (an image finds its own caption), concept accuracy
(a caption of its concept), the mean cosine between images (near 1: everything looks the same) and
how many distinct captions the images retrieve at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdclip.config import LossConfig
from pdclip.teacher import make_teacher


@dataclass
class ToyPairs:
    """`x_image` `(N, d)` and `x_text` `(N, d)` raw features of N pairs; `concept` `(N,)` their concepts."""

    x_image: Tensor
    x_text: Tensor
    concept: Tensor

    def __len__(self) -> int:
        return len(self.concept)


def toy_pairs(n_pairs: int = 512, n_concepts: int = 16, dim: int = 32, noise: float = 0.5, seed: int = 0) -> ToyPairs:
    """Pairs around `n_concepts` random centres; a caption is its centre mixed by a fixed random matrix."""
    g = torch.Generator().manual_seed(seed)
    concept = torch.randint(0, n_concepts, (n_pairs,), generator=g)
    centres = torch.randn(n_concepts, dim, generator=g)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5  # captions live in another space
    x_image = centres[concept] + noise * torch.randn(n_pairs, dim, generator=g)
    x_text = centres[concept] @ mixing + noise * torch.randn(n_pairs, dim, generator=g)
    return ToyPairs(x_image, x_text, concept)


def toy_encoder(dim_in: int = 32, dim_out: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, 64), nn.ReLU(), nn.Linear(64, dim_out))


LossFn = Callable[[Tensor, Tensor, int, dict], Tensor]


def train_toy(loss_fn: LossFn, pairs: ToyPairs, steps: int, batch_size: int = 64, lr: float = 1e-3,
              teacher: LossConfig | None = None, teacher_scale: float = 10.0, seed: int = 0) -> dict:
    """Train two `toy_encoder`s with Adam on random batches of `pairs`; score them on every pair.

    Args:
        loss_fn: `(u, v, step, teacher_features) -> loss`, with `u`, `v` the raw encoder outputs `(B, 16)`
            and `teacher_features` the keyword arguments `pdclip.methods.method_loss` takes for a teacher
            network (empty without `teacher`).
        teacher: a PSD `LossConfig` whose teacher is a network (EMA, snapshot); it is updated before the
            student's forward, as `pdclip.train` does, and its normalised features go to `loss_fn`.
        teacher_scale: the teacher's temperature multiplier (the toy's `t` is fixed).

    Returns:
        `loss_first` / `loss_last` (means of the first and last 20 steps), `r1`, `concept_acc`,
        `mean_image_cosine`, `distinct_captions`, and every step's `losses`.
    """
    torch.manual_seed(seed)
    model = nn.ModuleDict({"image": toy_encoder(pairs.x_image.shape[1]), "text": toy_encoder(pairs.x_text.shape[1])})
    ema = make_teacher(model, teacher) if teacher is not None else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(pairs), (batch_size,))
        teacher_features = {}
        if ema is not None:
            ema.update(model)  # before the student's forward, as pdclip.train does
            with torch.no_grad():
                teacher_features = {
                    "teacher_image_features": F.normalize(ema.module["image"](pairs.x_image[idx]), dim=-1),
                    "teacher_text_features": F.normalize(ema.module["text"](pairs.x_text[idx]), dim=-1),
                    "teacher_logit_scale": torch.tensor(teacher_scale)}
        loss = loss_fn(model["image"](pairs.x_image[idx]), model["text"](pairs.x_text[idx]), step, teacher_features)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return {**score_toy(model, pairs), "loss_first": sum(losses[:20]) / len(losses[:20]),
            "loss_last": sum(losses[-20:]) / len(losses[-20:]), "losses": losses}


@torch.no_grad()
def score_toy(model: nn.ModuleDict, pairs: ToyPairs) -> dict:
    """R@1, concept accuracy, mean image-image cosine and distinct retrieved captions over all pairs."""
    u, v = F.normalize(model["image"](pairs.x_image), dim=-1), F.normalize(model["text"](pairs.x_text), dim=-1)
    best = (u @ v.T).argmax(-1)
    return {"r1": (best == torch.arange(len(pairs))).float().mean().item(),
            "concept_acc": (pairs.concept[best] == pairs.concept).float().mean().item(),
            "mean_image_cosine": (u @ u.T).mean().item(), "distinct_captions": best.unique().numel()}
