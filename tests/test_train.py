"""The training loop: every method learns, resume is exact, bad losses and options fail clearly."""

import json
import math

import pytest
import torch

import pdclip.train
from pdclip.checkpoint import RunFiles, load_checkpoint, read_checkpoint
from pdclip.cli import parse_cli
from pdclip.config import CONFIG_DIR, METHODS, TrainConfig, load_config
from pdclip.methods import method_loss
from pdclip.train import NonFiniteLossError, fit, main


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    """16 pairs, batch 16: a memorisation task a tiny ViT solves in a few CPU steps."""
    base = TrainConfig(out=str(tmp_path / name), steps=10, batch_size=16, lr=1e-3, warmup_steps=2,
                       data_kwargs={"n_train": 16, "n_eval": 16}, snapshot_every=5, snapshot_size=8,
                       save_every=5, progress=False)
    return base.with_overrides(overrides)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns(tmp_path, method):
    summary = fit(tiny(tmp_path, method=method, snapshot_every=0, save_every=0))
    values = losses(tmp_path / "run")
    assert len(values) == 10 and all(math.isfinite(v) for v in values)
    assert values[-1] < 0.8 * values[0], values
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "alpha", "lr", "logit_scale", "logit_scale_soft", "samples_per_s"} <= set(record)
    if method in ("kd", "otter"):
        assert {"loss_clip", "loss_soft"} <= set(record)
    assert summary["step"] == 10 and read_checkpoint(summary["checkpoint"])["step"] == 10


def test_snapshots_hold_probe_logits_and_targets(tmp_path):
    fit(tiny(tmp_path, method="psd", psd_subset=1.0))
    snaps = sorted((tmp_path / "run" / "snapshots").glob("step_*.pt"))
    assert [p.name for p in snaps] == ["step_000000.pt", "step_000005.pt", "step_000010.pt"]
    first, last = (torch.load(p, weights_only=True) for p in (snaps[0], snaps[-1]))
    assert first["logits"].shape == first["targets_i2t"].shape == (8, 8)
    torch.testing.assert_close(last["targets_i2t"].sum(-1), torch.ones(8))
    assert torch.equal(first["index"], last["index"])  # the same probe pairs every time
    torch.testing.assert_close(first["targets_i2t"], torch.eye(8))  # alpha = 0 at step 0
    assert last["alpha"] == pytest.approx(0.5) and not torch.allclose(last["targets_i2t"], torch.eye(8))


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    # PSD with an EMA teacher exercises data order, RNG (PSD subsets), alpha, lr, EMA and optimiser.
    opts = {"method": "psd", "psd_teacher": "ema", "save_every": 2, "steps": 7}
    fit(tiny(tmp_path, "full", **opts))

    def kill_at_step_5(model, step):
        if step == 5:  # after step 5 was logged; the last checkpoint is step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, "killed", eval_every=5, **opts), eval_fn=kill_at_step_5)
    assert read_checkpoint(tmp_path / "killed")["step"] == 4 and len(losses(tmp_path / "killed")) == 5
    fit(tiny(tmp_path, "killed", resume=True, **opts))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert len(resumed) == 7
    assert resumed == pytest.approx(full, abs=1e-6, rel=0)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    fit(tiny(tmp_path, steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        fit(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match="lr"):
        fit(tiny(tmp_path, steps=2, lr=0.5, resume=True))
    fit(tiny(tmp_path, steps=3, overwrite=True))
    assert len(losses(tmp_path / "run")) == 3


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    calls = []

    def nan_at_third_step(*args, **kwargs):
        out = method_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the step-0 snapshot, then steps 1, 2 and 3
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(pdclip.train, "method_loss", nan_at_third_step)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3.*step 2\)"):
        fit(tiny(tmp_path, save_every=2, snapshot_every=100))
    model, cfg = load_checkpoint(tmp_path / "run")
    assert read_checkpoint(tmp_path / "run")["step"] == 2 and cfg.steps == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_options_name_the_option(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown option --stpes"):
        parse_cli(["--stpes=3"])
    with pytest.raises(ValueError, match="--steps expects int"):
        parse_cli(["--steps", "many"])
    with pytest.raises(ValueError, match="method must be one of"):
        parse_cli(["--method=simclr"])
    with pytest.raises(ValueError, match="optimizer"):
        parse_cli(["--optimizer=adam"])
    with pytest.raises(SystemExit) as exit_:  # argparse's convention: status 2, one line on stderr
        main(["--lr_max=1", f"--out={tmp_path}"])
    assert exit_.value.code == 2 and "error: unknown option --lr_max" in capsys.readouterr().err


def test_cli_overrides_and_shipped_configs():
    cfg = parse_cli(["--config", "tutorial_cpu", "--method", "otter", "--freeze-text", "--batch_size=32",
                     "--pretrained_text=all-MiniLM-L6-v2"])
    assert (cfg.loss.method, cfg.freeze_text, cfg.batch_size, cfg.model) == ("otter", True, 32, "pdclip-vit-tiny")
    for path in CONFIG_DIR.glob("*.json"):
        assert load_config(path.stem) == TrainConfig.from_dict(json.loads(path.read_text()))
    assert load_config("otter_rn50_cc3m").optimizer == "sgd"


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value on the host: `.item()`, `bool(t)`, `float(t)` (each an
    `aten::_local_scalar_dense`) and `.tolist()` (a direct read on a CPU, so counted by a wrapper). On an
    accelerator each is a sync that waits for the queue to drain; on a CPU the same calls, only free."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("accum_freq", [1, 2])
def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch, method, accum_freq):
    """One host sync per step (the metrics record and the loss's finiteness, read together), on the path
    an accelerator takes: Sinkhorn's scaling half-steps, which read the host each, run only on a CPU."""
    import pdclip.targets

    monkeypatch.setattr(pdclip.targets, "SCALING_DEVICES", ())
    trainer = pdclip.train.Trainer(tiny(tmp_path, method=method, accum_freq=accum_freq, snapshot_every=0))
    try:
        trainer.train_step(next(trainer.batches))  # first step: lazy set-up is not the loop's cost
        batch = next(trainer.batches)  # the data loader's work is not the step's
        with _HostReads(monkeypatch) as reads:
            record = trainer.train_step(batch)
    finally:
        RunFiles.close_started()  # what fit does: train.log's tee off stdout
    assert reads.count == 1, f"{method}: {reads.count} host reads in one step"
    assert all(isinstance(v, int | float) for v in record.values()), record
