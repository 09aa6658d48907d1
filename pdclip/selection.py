"""Choosing a training budget on validation data, per run: an evaluation hook for `pdclip.train.fit`
that scores the model on every evaluation, records each metric against steps, and keeps the
trainable weights of the step with the best validation score, for each score it is asked to watch.

Methods converge at different speeds, and a contrastive head can overfit noisy captions: compared
at one fixed step count, a method that only slows fitting looks like a gain. Early stopping on
validation gives each run its own budget. The run still trains to the end, so the curve shows what
happens after the best step, and `restore` puts the best weights back afterwards:

    keep = KeepBest(lambda model: cached_splits(model, "clipart", ("val",), kwargs),
                    {"zeroshot": "val/zeroshot/category/mean_per_class_recall", "retrieval": "val/retrieval/i2t_R@1"})
    fit(dataclasses.replace(cfg, eval_steps=(10, 20, 50, 100, 200)), eval_fn=keep)
    keep.restore(model, "retrieval")  # a model loaded from the last checkpoint now holds that best step's heads

`fit_selected` does all of it and scores the model at every chosen step (notebooks 06 and 08).

One metric can peak long before another (on noisy clip art, CLIP's zero-shot accuracy peaks within
the first 100 steps while its retrieval still climbs at 750): each is read at its own best step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from pdclip.config import TrainConfig
from pdclip.evaluate import evaluate_model
from pdclip.models import frozen_backbones, load_trainable_state

# `splits(model) -> (encoder, {split: dataset})`: `pdclip.features.cached_splits` for frozen towers,
# or `lambda m: (m, {...})` for full ones; called once, on the first evaluation.
SplitsFn = Callable[[nn.Module], tuple[nn.Module, dict[str, Dataset]]]


class KeepBest:
    """An `eval_fn` that keeps, for each watched score, the step where it is highest (the earliest of ties).

    Args:
        splits: builds the encoder and the datasets to score, on the first evaluation.
        keys: `{name: metric key}` to watch, e.g. `{"zeroshot": "val/zeroshot/category/top1"}`.
        max_samples: per split, as `pdclip.evaluate.evaluate_model` (None: whole splits).

    Attributes:
        curve: `[{"step": s, metric: value, ...}]`, one entry per evaluation (chance levels left out).
        best_step, best_score: `{name: step}`, `{name: score}` of the steps chosen so far.
    """

    def __init__(self, splits: SplitsFn, keys: dict[str, str], max_samples: int | None = None):
        self.splits, self.keys, self.max_samples = splits, dict(keys), max_samples
        self.curve: list[dict[str, float]] = []
        self.best_step: dict[str, int] = {}
        self.best_score = {name: -math.inf for name in self.keys}
        self._best_state: dict[str, dict[str, torch.Tensor]] = {}
        self._data: tuple[nn.Module, dict[str, Dataset]] | None = None

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        if self._data is None:
            self._data = self.splits(model)
        encoder, datasets = self._data
        scores = evaluate_model(encoder, datasets, max_samples=self.max_samples, linear_probe=False)
        missing = [k for k in self.keys.values() if k not in scores]
        if missing:
            raise KeyError(f"KeepBest: {missing} not among the scores (e.g. {sorted(scores)[:6]})")
        self.curve.append({"step": step, **{k: v for k, v in scores.items() if not k.startswith("chance/")}})
        frozen = tuple(frozen_backbones(model))  # ~110 MB that never change: not copied
        for name, key in self.keys.items():
            if scores[key] > self.best_score[name]:
                self.best_score[name], self.best_step[name] = scores[key], step
                self._best_state[name] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                          if not k.startswith(frozen)}
        return scores

    def restore(self, model: nn.Module, name: str) -> int:
        """Load the trainable weights of `name`'s best step into `model` (the run's model, or one loaded
        from its checkpoint); returns that step."""
        if name not in self._best_state:
            raise RuntimeError(f"KeepBest.restore: no evaluation of {name!r} has run "
                               f"(watched: {list(self.keys)}; set eval_steps or eval_every, and call fit with this hook)")
        load_trainable_state(model, self._best_state[name], {})
        return self.best_step[name]


def fit_selected(cfg: TrainConfig, splits: SplitsFn, keys: dict[str, str],
                 score: Callable[[nn.Module, str], dict[str, float]]) -> dict:
    """Train `cfg` (evaluating at its `eval_steps` / `eval_every`), then `score(model, budget)` the model
    at its last step (budget "final") and at each watched key's best validation step (budget: the key's
    name), so a caller can score each budget on what it reads there.

    Returns:
        `{"final": {"step", **scores}, name: {"step", **scores} for each key, "curve": KeepBest.curve,
        "out": the run folder}`.
    """
    from pdclip.checkpoint import load_checkpoint
    from pdclip.run_setup import pick_device
    from pdclip.train import fit

    if not cfg.eval_steps and not cfg.eval_every:
        raise ValueError("fit_selected needs evaluations to choose from: set eval_steps or eval_every")
    keep = KeepBest(splits, keys)
    summary = fit(cfg, eval_fn=keep)
    model, _ = load_checkpoint(summary["checkpoint"], pick_device(cfg.device))
    out = {"final": {"step": cfg.steps, **score(model, "final")}, "curve": keep.curve, "out": summary["out"]}
    for name in keys:
        out[name] = {"step": keep.restore(model, name), **score(model, name)}
    return out
