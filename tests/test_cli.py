"""The `python -m pdclip.train` command line: --help from the config dataclasses, resume and numbered
checkpoints, the run's log file and TensorBoard."""

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from pdclip import evaluate
from pdclip.checkpoint import latest_checkpoint, numbered_checkpoints, read_checkpoint
from pdclip.cli import cli_help, field_docs, parse_cli
from pdclip.config import CHOICES, LossConfig, TrainConfig
from pdclip.train import fit, main


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    """16 synthetic pairs, batch 8, a tiny ViT: about a second per run on a CPU."""
    base = TrainConfig(out=str(tmp_path / name), steps=4, batch_size=8, warmup_steps=1, precision="fp32",
                       data_kwargs={"n_train": 16, "n_eval": 16}, snapshot_every=0, save_every=2, progress=False)
    return base.with_overrides(overrides)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cls", [TrainConfig, LossConfig])
def test_every_field_has_a_description(cls):
    # A new field without a trailing (or preceding) comment fails here, so --help never shows a bare name.
    docs = field_docs(cls)
    assert [f.name for f in fields(cls) if not docs.get(f.name)] == []
    assert field_docs(TrainConfig)["steps"] == "optimiser updates"  # a trailing comment
    assert field_docs(LossConfig)["psd_teacher"].startswith("Whose predictions become the soft targets")  # a block above


def test_help_lists_every_option_with_description_default_and_choices(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_:
            main([flag, "--steps=3"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == cli_help()
    text = cli_help()
    for cls in (TrainConfig, LossConfig):
        for f in fields(cls):
            if f.name != "loss":
                assert f"--{f.name.replace('_', '-')} " in text, f.name
    assert re.search(r"\n  --steps INT +optimiser updates \(default: 300\)\n", text)
    flat = " ".join(text.split())  # descriptions wrap at 110 columns
    assert "(choices: clip, ls, kd, psd, otter; default: clip)" in flat
    assert "(choices: auto, fp32, bf16, fp16; default: auto)" in flat
    assert "tutorial_cpu" in flat  # the shipped recipes --config accepts


def test_help_runs_as_a_module_and_evaluate_has_one_too(capsys):
    done = subprocess.run([sys.executable, "-m", "pdclip.train", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "--keep-checkpoints INT" in done.stdout and not done.stderr
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(["--help"])
    assert exit_.value.code == 0 and "--checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_choice_constants_are_what_validation_accepts(name):
    for value in CHOICES[name]:
        assert parse_cli([f"--{name}={value}"]).to_dict().get(name, value) == value
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        parse_cli([f"--{name}=bogus"])


def test_resume_values_old_and_new():
    assert TrainConfig.from_dict({"resume": True}).resume == "latest"  # configs written before "latest"
    assert TrainConfig.from_dict({"resume": False}).resume is None
    assert parse_cli(["--resume"]).resume == "latest"  # the bare flag keeps its meaning
    assert parse_cli(["--resume", "runs/x/checkpoint_000100.pt"]).resume == "runs/x/checkpoint_000100.pt"
    assert parse_cli(["--resume=none"]).resume is None


def test_numbered_checkpoints_are_kept_and_resume_from_a_path_is_exact(tmp_path):
    run = tmp_path / "run"
    fit(tiny(tmp_path, steps=8, keep_checkpoints=2))
    assert [p.name for p in numbered_checkpoints(run)] == ["checkpoint_000006.pt", "checkpoint_000008.pt"]
    assert (run / "checkpoint.pt").samefile(run / "checkpoint_000008.pt") and latest_checkpoint(run).name.endswith("8.pt")
    full = losses(run)
    # Back to step 6: the later checkpoint is dropped with the log lines after it, then retrained equal.
    fit(tiny(tmp_path, steps=8, keep_checkpoints=2, resume=str(run / "checkpoint_000006.pt")))
    assert losses(run) == pytest.approx(full, abs=1e-6, rel=0)
    assert read_checkpoint(run)["step"] == 8 and read_checkpoint(run / "checkpoint.pt")["step"] == 8
    assert "deleted the later checkpoints ['checkpoint_000008.pt']" in (run / "train.log").read_text()


def test_keep_zero_keeps_every_checkpoint_and_resume_latest_continues(tmp_path):
    def kill_at_step_5(model, step):
        if step == 5:  # the last checkpoint is step 4
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, steps=6, keep_checkpoints=0, eval_every=5), eval_fn=kill_at_step_5)
    fit(tiny(tmp_path, steps=6, keep_checkpoints=0, resume="latest"))
    assert [read_checkpoint(p)["step"] for p in numbered_checkpoints(run)] == [2, 4, 6]
    assert len(losses(run)) == 6


def test_train_log_holds_pdclip_records_and_prints(tmp_path, request):
    def eval_fn(model, step):  # stands in for the data reader's INFO lines and the feature cache's prints
        logging.getLogger("pdclip.data.shards").info("kept 15 of 16 samples")
        print("feature cache: reading somewhere.npy")
        return {"score": 1.0}

    pdclip_log = logging.getLogger("pdclip")
    request.addfinalizer(lambda level=pdclip_log.level: pdclip_log.setLevel(level))
    pdclip_log.setLevel(logging.WARNING)  # as where no one configured logging (setLevel: clears its caches)
    fit(tiny(tmp_path, steps=2, eval_every=2), eval_fn=eval_fn)
    text = (tmp_path / "run" / "train.log").read_text()
    for line in ("INFO pdclip.data.shards: kept 15 of 16 samples", "feature cache: reading somewhere.npy",
                 "saved", "step 2 evaluation", "finished at step 2"):
        assert line in text, line
    assert sys.stdout.__class__.__name__ != "_Tee" and pdclip_log.level == logging.WARNING  # both given back


def test_report_to_tensorboard_writes_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tiny(tmp_path, steps=3, report_to="tensorboard", eval_every=3), eval_fn=lambda model, step: {"acc": 0.5})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("eval/acc")] == [0.5]
    recorded = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(recorded)


def test_report_to_tensorboard_without_it_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(SystemExit) as exit_:
        main(["--report-to", "tensorboard", f"--out={tmp_path / 'run'}", "--steps=1"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert err == ("error: --report-to tensorboard needs the tensorboard package: "
                   "pip install 'pdclip[tensorboard]' (or pip install tensorboard)")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_checkpoints_hold_only_what_weights_only_loads(tmp_path):
    fit(tiny(tmp_path, steps=2))
    ckpt = torch.load(tmp_path / "run" / "checkpoint_000002.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["resume"] is None


def test_a_log_tee_outlives_its_file(tmp_path):
    """A run never closed (a notebook kernel's Trainer) leaves its tee on stdout; once logging closes the
    file at exit, prints still reach the terminal and nothing raises."""
    import io

    from pdclip.checkpoint import _Tee

    terminal, file = io.StringIO(), open(tmp_path / "train.log", "w")  # noqa: SIM115
    tee = _Tee(terminal, file)
    tee.write("kept\n")
    file.close()
    tee.write("after\n")
    tee.flush()
    assert terminal.getvalue() == "kept\nafter\n" and (tmp_path / "train.log").read_text() == "kept\n"
