"""A toy alignment problem that trains in seconds on a CPU: notebook 03's toy.

`toy_pairs(...)` draws image/caption *feature* pairs from a few concepts (captions live in another,
linearly mixed space; a fraction of them may describe a wrong concept, as noisy web captions do);
`train_toy(loss_fn, pairs, steps)` trains two small MLP encoders on them with any loss and scores the
result on every training pair: R@1 (an image finds its own caption), concept accuracy (a caption of its
image's concept), the mean cosine between images (near 1: everything looks the same) and how many
distinct captions the images retrieve at all; and, given held-out pairs, their concept accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdclip.config import LossConfig
from pdclip.methods import MethodOutput
from pdclip.teacher import make_teacher


@dataclass
class ToyPairs:
    """`x_image` `(N, d)` and `x_text` `(N, d)` raw features of N pairs; `concept` `(N,)` the images'
    concepts and `text_concept` `(N,)` the captions' (another one on a mismatched pair)."""

    x_image: Tensor
    x_text: Tensor
    concept: Tensor
    text_concept: Tensor

    def __len__(self) -> int:
        return len(self.concept)


def toy_pairs(n_pairs: int = 512, n_concepts: int = 16, dim: int = 32, noise: float = 0.5, mismatch: float = 0.0,
              seed: int = 0, split: str = "train") -> ToyPairs:
    """Pairs around `n_concepts` random centres; a caption is its centre mixed by a fixed random matrix.

    The centres and the mixing depend on `seed` only, the samples on `(seed, split)`: another split is
    fresh pairs of the same concepts. A fraction `mismatch` of the captions describe a random concept
    instead of their image's (possibly the same one).
    """
    world = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_concepts, dim, generator=world)
    mixing = torch.randn(dim, dim, generator=world) / dim**0.5  # captions live in another space
    g = torch.Generator().manual_seed(1000 * seed + {"train": 1, "test": 2}[split])
    concept = torch.randint(0, n_concepts, (n_pairs,), generator=g)
    wrong = torch.rand(n_pairs, generator=g) < mismatch
    text_concept = torch.where(wrong, torch.randint(0, n_concepts, (n_pairs,), generator=g), concept)
    x_image = centres[concept] + noise * torch.randn(n_pairs, dim, generator=g)
    x_text = centres[text_concept] @ mixing + noise * torch.randn(n_pairs, dim, generator=g)
    return ToyPairs(x_image, x_text, concept, text_concept)


def toy_encoder(dim_in: int = 32, dim_out: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, 64), nn.ReLU(), nn.Linear(64, dim_out))


# `(u, v, step, teacher_features) -> loss`, or a method's output (its logged parts are kept).
LossFn = Callable[[Tensor, Tensor, int, dict], "Tensor | MethodOutput"]
LOGGED = ("train_confidence", "target_offdiag")  # parts of pdclip.methods.method_loss kept per step


def train_toy(loss_fn: LossFn, pairs: ToyPairs, steps: int, batch_size: int = 64, lr: float = 1e-3,
              teacher: LossConfig | None = None, teacher_scale: float = 10.0, seed: int = 0,
              heldout: ToyPairs | None = None, heldout_every: int = 0) -> dict:
    """Train two `toy_encoder`s with Adam on random batches of `pairs`; score them on every pair.

    Args:
        loss_fn: `(u, v, step, teacher_features) -> loss` (a scalar, or `method_loss`'s output), with
            `u`, `v` the raw encoder outputs `(B, 16)` and `teacher_features` the keyword arguments
            `pdclip.methods.method_loss` takes for a teacher network (empty without `teacher`).
        teacher: a PSD `LossConfig` whose teacher is a network (EMA, snapshot); it is updated before the
            student's forward, as `pdclip.train` does, and its normalised features go to `loss_fn`.
        teacher_scale: the teacher's temperature multiplier (the toy's `t` is fixed).
        heldout: pairs never trained on, scored by concept accuracy (`heldout_concept_acc`), and every
            `heldout_every` steps during training when that is > 0 (`heldout_curve`: `[(step, acc)]`).

    Returns:
        `loss_first` / `loss_last` (means of the first and last 20 steps), `r1`, `concept_acc`,
        `mean_image_cosine`, `distinct_captions` on the training pairs, every step's `losses`, and the
        last 20 steps' means of `LOGGED` (NaN when the loss logs none).
    """
    torch.manual_seed(seed)  # the same seed, the same initialisation and batches for every loss
    model = nn.ModuleDict({"image": toy_encoder(pairs.x_image.shape[1]), "text": toy_encoder(pairs.x_text.shape[1])})
    ema = make_teacher(model, teacher) if teacher is not None else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses, logged, curve = [], {k: [] for k in LOGGED}, []
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
        if isinstance(loss, MethodOutput):
            for k in LOGGED:
                logged[k].append(float(loss.parts.get(k, 0.0)))  # CLIP's targets: nothing off the diagonal
            loss = loss.loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if heldout is not None and heldout_every > 0 and (step + 1) % heldout_every == 0:
            curve.append((step + 1, score_toy(model, heldout)["concept_acc"]))
    scores = score_toy(model, pairs)
    if heldout is not None:
        scores.update(heldout_concept_acc=score_toy(model, heldout)["concept_acc"], heldout_curve=curve)
    return {**scores, "loss_first": _tail_mean(losses[:20]), "loss_last": _tail_mean(losses),
            **{k: _tail_mean(v) for k, v in logged.items()}, "losses": losses}


def _tail_mean(values: list[float], n: int = 20) -> float:
    return sum(values[-n:]) / len(values[-n:]) if values else math.nan


@torch.no_grad()
def score_toy(model: nn.ModuleDict, pairs: ToyPairs) -> dict:
    """R@1, concept accuracy (the retrieved caption's concept is the image's), mean image-image cosine
    and distinct retrieved captions, over all pairs."""
    u, v = F.normalize(model["image"](pairs.x_image), dim=-1), F.normalize(model["text"](pairs.x_text), dim=-1)
    best = (u @ v.T).argmax(-1)
    return {"r1": (best == torch.arange(len(pairs))).float().mean().item(),
            "concept_acc": (pairs.text_concept[best] == pairs.concept).float().mean().item(),
            "mean_image_cosine": (u @ u.T).mean().item(), "distinct_captions": best.unique().numel()}
