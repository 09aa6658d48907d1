"""Budgets chosen on validation: `eval_steps` schedules evaluations, `KeepBest` keeps each watched
score's best step and puts those weights back."""

from __future__ import annotations

import pytest
import torch

from pdclip.checkpoint import load_checkpoint
from pdclip.config import TrainConfig
from pdclip.data import build_dataset
from pdclip.evaluate import evaluate_model
from pdclip.selection import KeepBest
from pdclip.train import fit


def tiny(tmp_path, **overrides) -> TrainConfig:
    """16 synthetic pairs, batch 8, a tiny ViT: about a second per run on a CPU."""
    base = TrainConfig(out=str(tmp_path / "run"), steps=8, batch_size=8, warmup_steps=1, precision="fp32",
                       data_kwargs={"n_train": 16, "n_eval": 16}, snapshot_every=0, save_every=8, progress=False)
    return base.with_overrides(overrides)


def val_split(model):
    return model, {"val": build_dataset("synthetic", "val", n_train=16, n_eval=16, image_size=model.image_size)}


def test_eval_steps_schedule_evaluations_beside_eval_every(tmp_path):
    seen = []
    fit(tiny(tmp_path, eval_steps=[1, 2, 5], eval_every=4), eval_fn=lambda model, step: seen.append(step) or {})
    assert seen == [1, 2, 4, 5, 8]  # the listed steps, every 4th, and the last
    with pytest.raises(ValueError, match="eval_steps must be steps >= 1"):
        tiny(tmp_path, eval_steps=[0, 3])


def test_keep_best_restores_each_watched_scores_best_step(tmp_path):
    keys = {"zeroshot": "val/zeroshot/colour_shape/top1", "retrieval": "val/retrieval/i2t_R@1"}
    keep = KeepBest(val_split, keys)
    summary = fit(tiny(tmp_path, eval_steps=[1, 2, 3, 4, 5, 6, 7]), eval_fn=keep)
    assert [c["step"] for c in keep.curve] == list(range(1, 9))
    for name, key in keys.items():
        values = [c[key] for c in keep.curve]
        best = keep.curve[values.index(max(values))]["step"]  # the earliest of ties
        assert keep.best_step[name] == best and keep.best_score[name] == max(values)
        model, _ = load_checkpoint(summary["checkpoint"], "cpu")  # the last step's weights
        assert keep.restore(model, name) == best
        again = evaluate_model(*val_split(model), linear_probe=False)
        assert again[key] == pytest.approx(max(values))  # the best step's weights, not the last step's


def test_keep_best_copies_weights_not_references(tmp_path):
    """Training on after the best step must not change what was kept."""
    keep = KeepBest(val_split, {"r": "val/retrieval/i2t_R@1"})
    fit(tiny(tmp_path, eval_steps=[1]), eval_fn=keep)
    kept = {k: v.clone() for k, v in keep._best_state["r"].items()}
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt", "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    keep.restore(model, "r")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())


def test_keep_best_says_what_is_missing():
    keep = KeepBest(val_split, {"zs": "val/zeroshot/colour_shape/top1"})
    with pytest.raises(RuntimeError, match="no evaluation of 'zs' has run"):
        keep.restore(torch.nn.Linear(1, 1), "zs")
    typo = KeepBest(val_split, {"zs": "val/zeroshot/colour_shap/top1"})
    from pdclip.models import model_from_config

    with pytest.raises(KeyError, match="colour_shap"):
        typo(model_from_config(TrainConfig()), 1)
