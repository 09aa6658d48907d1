"""Gradient accumulation (`accum_freq`): one update in k micro-batches is the update of the whole batch.

The towers here are LayerNorm / linear ones (pdclip-vit-tiny; the feature cache's heads): their forward
of a pair does not depend on the rest of the micro-batch. A BatchNorm tower (pdclip-rn-tiny) normalises
with each micro-batch's statistics, so its accumulated update cannot equal the big batch's exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from pdclip.checkpoint import read_checkpoint
from pdclip.config import PSD_TEACHERS, TrainConfig
from pdclip.train import Trainer, fit

# Every method; PSD with every teacher, at a constant alpha (a linear schedule's alpha is 0 at step 0).
CASES = {"clip": {}, "ls": {}, "kd": {}, "otter": {},
         **{f"psd-{t}": {"method": "psd", "psd_teacher": t, "psd_schedule": "constant"} for t in PSD_TEACHERS},
         "clip-multi-positive": {"multi_positive": True}}
# SGD without momentum, decay or clipping: the update is lr x the gradient, so equal gradients give equal weights.
STEP = {"steps": 1, "lr": 0.1, "warmup_steps": 0, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
        "grad_clip": 0.0, "snapshot_every": 0, "save_every": 0, "progress": False, "precision": "fp32",
        "device": "cpu"}


def one_step(tmp_path, name: str, accum_freq: int, **overrides) -> tuple[dict, dict, Trainer]:
    """One update on the first batch of 12 pairs: the record, every gradient, the trainer."""
    method = overrides.pop("method", name.split("-")[0])
    cfg = TrainConfig(out=str(tmp_path / f"{name}-{accum_freq}"), batch_size=12, accum_freq=accum_freq,
                      data_kwargs={"n_train": 12, "n_eval": 8}, **STEP).with_overrides({"method": method, **overrides})
    trainer = Trainer(cfg)
    record = trainer.train_step(next(trainer.batches))
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return record, grads, trainer


def assert_same_update(tmp_path, name: str, k: int, **overrides) -> None:
    (rec_1, grads_1, big), (rec_k, grads_k, accum) = (one_step(tmp_path, name, f, **overrides) for f in (1, k))
    for key in ("loss", "loss_clip", "loss_soft"):
        if key in rec_1:
            assert rec_k[key] == pytest.approx(rec_1[key], abs=1e-5, rel=1e-5), key
    assert grads_k.keys() == grads_1.keys()
    # The temperature's gradient is not 0: counting it in every micro-step (k x) would fail below.
    assert grads_1["logit_scale"].abs() > 1e-3
    for key in grads_1:
        torch.testing.assert_close(grads_k[key], grads_1[key], rtol=1e-5, atol=1e-5, msg=key)
    for (key, p_k), p_1 in zip(accum.model.state_dict().items(), big.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p_k, p_1, rtol=1e-5, atol=1e-5, msg=key)
    # PSD's subset was drawn once per update: the generators move on together.
    assert torch.equal(accum.generator.get_state(), big.generator.get_state())


@pytest.mark.parametrize("name", CASES)
def test_accumulated_update_equals_the_big_batch(tmp_path, name):
    assert_same_update(tmp_path, name, 3, **CASES[name])


def test_uneven_micro_batches_and_the_feature_cache(tmp_path):
    # The heads-only path on cached backbone features; 12 pairs in micro-batches of 3 (k = 4).
    towers = {"pretrained_text": "all-MiniLM-L6-v2", "freeze_text": True, "pretrained_image": "efficientnet_lite0",
              "freeze_image": True, "image_size": 32, "head": "mlp", "head_hidden": 32, "embed_dim": 16,
              "feature_cache": True, "feature_cache_dir": str(tmp_path / "cache")}
    assert_same_update(tmp_path, "otter", 4, **towers)


def test_accum_freq_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of accum_freq"):
        TrainConfig(batch_size=12, accum_freq=5)


@pytest.mark.slow
def test_two_gloo_processes_accumulating_match_one_process(tmp_path):
    # PSD with an EMA teacher: a random subset, teacher features and soft targets over the global batch.
    args = ["--method=psd", "--psd_schedule=constant", "--steps=2", "--batch_size=16", "--warmup_steps=0",
            "--optimizer=sgd", "--lr=0.1",  # an update linear in the gradient
            "--save_every=2", "--snapshot_every=0", '--data_kwargs={"n_train": 16, "n_eval": 8}',
            "--progress=false", "--device=cpu"]
    fit(TrainConfig(out=str(tmp_path / "one")).with_overrides(
        {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in args}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pdclip.train", *args, "--accum_freq=2", f"--out={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("one", "two"))
    assert len(two) == 2 and two == pytest.approx(one, rel=1e-5, abs=1e-5)
    w1, w2 = (read_checkpoint(tmp_path / name)["model"] for name in ("one", "two"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
