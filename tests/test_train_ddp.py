"""Two gloo processes on the CPU train exactly like one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pdclip.checkpoint import read_checkpoint
from pdclip.cli import parse_cli
from pdclip.train import fit

# OTTER: soft targets (Sinkhorn) on the global batch, an EMA teacher and two temperatures.
ARGS = ["--method=otter", "--steps=4", "--batch_size=16", "--lr=1e-3", "--warmup_steps=1", "--save_every=4",
        "--snapshot_every=4", "--snapshot_size=8", '--data_kwargs={"n_train": 32, "n_eval": 16}',
        "--progress=false"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    fit(parse_cli([*ARGS, f"--out={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pdclip.train", *ARGS, f"--out={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one, two = records("one"), records("two")
    assert len(one) == len(two) == 4
    for key in ("loss", "loss_clip", "loss_soft", "logit_scale_soft"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-5), key
    w1, w2 = (read_checkpoint(tmp_path / name)["model"] for name in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4, msg=k)
    s1, s2 = (torch.load(tmp_path / name / "snapshots" / "step_000004.pt", weights_only=True) for name in ("one", "two"))
    assert torch.equal(s1["index"], s2["index"])
    torch.testing.assert_close(s2["targets_i2t"], s1["targets_i2t"], rtol=1e-3, atol=1e-4)


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pdclip.train",
           *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_ranks_on_uneven_shards_agree_on_epochs_and_fail_fast_without_shards(tmp_path):
    from pdclip.data import build_dataset
    from pdclip.data.shard_writer import write_shards

    # 28 pairs as shards of 8, 8, 8 and 4: whichever rank holds the short one runs out after 3 batches of 4,
    # and then both ranks start the next epoch (a rank going on alone would desynchronise the global batch).
    write_shards(build_dataset("synthetic", "train", n_train=28, image_size=32, augment=False), tmp_path, 8)
    common = ["--dataset=shards", "--image_size=32", "--batch_size=8", "--warmup_steps=1", "--snapshot_every=0",
              "--progress=false"]
    proc = torchrun([*common, f"--train_data={tmp_path}/shard-{{00000..00003}}.tar", "--steps=7", "--save_every=7",
                     f"--out={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint(tmp_path / "run")["data"] == {"epoch": 2, "batch": 1, "num_workers": 0, "world_size": 2}
    proc = torchrun([*common, f"--train_data={tmp_path}/shard-00000.tar", "--steps=2", f"--out={tmp_path / 'one'}"],
                    timeout=120)
    assert proc.returncode != 0 and "1 shard(s) for 2 readers (2 rank(s) x 1 worker(s))" in proc.stderr
