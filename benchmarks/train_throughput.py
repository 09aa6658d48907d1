"""Training throughput: pdclip's loop next to open_clip's own, and each method's step relative to CLIP's.

    python benchmarks/train_throughput.py                       # CPU: pdclip-vit-tiny, 64 px, fp32
    python benchmarks/train_throughput.py --model RN50 --batch-size 256 --workers 8   # GPU: 224 px, AMP

1. The same model config, batch size, precision, worker and thread count trained by `python -m
   pdclip.train --method clip` and by `python -m open_clip_train.main` (one subprocess each, alternated
   for `--rounds` rounds). Both report per-step samples/s including data loading; we print the medians
   after a warm-up. First each on its own synthetic data, which differ in cost (pdclip renders scenes,
   open_clip transforms one blank image): in pdclip's first epoch, where it renders every image, and
   in later ones, where it reads the pixels it kept; then both on the same webdataset shards (PNG,
   written here), where the data cost is equal and the ratio measures the loops.
2. Every method (and PSD with each kind of teacher) with pdclip's `Trainer`, all built in this process
   and stepped in turn on the same pre-loaded batches (clip, ls, ..., clip, ls, ...): median step time
   and its ratio to CLIP's, side by side. PSD with a free teacher ("self", "intra") should cost about
   nothing extra; KD, OTTER and PSD's "ema" pay one teacher forward and the EMA update.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from loss_overhead import VARIANTS, interleaved_medians

from pdclip.config import TrainConfig
from pdclip.data import build_dataset
from pdclip.data.shard_writer import write_shards
from pdclip.models import CONFIG_DIR
from pdclip.train import Trainer

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
# webdataset >= 0.2.96 ends each tar with an empty dict that open_clip_train's reader cannot take
# (mlfoundations/open_clip#935); its maintainers' fix is `eof_value=None`, applied here.
RUN_OPEN_CLIP = ("import functools, sys, open_clip, open_clip_train.data as d; open_clip.add_model_config(sys.argv[1]); "
                 "d.tar_file_expander = functools.partial(d.tar_file_expander, eof_value=None); "
                 "from open_clip_train.main import main; main(sys.argv[2:])")


def median_after_warmup(values: list[float], warmup: int) -> float:
    if len(values) <= warmup:
        raise RuntimeError(f"only {len(values)} steps measured, need more than the {warmup} warm-up steps")
    return statistics.median(values[warmup:])


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a subprocess with `threads` intra-op threads (torch, OpenMP and BLAS alike)."""
    return {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


def pdclip_rates(args, method: str, out: Path, shards: str | None = None, n_train: int | None = None) -> list[float]:
    """Per-step samples/s of `python -m pdclip.train` (on `n_train` pairs of its synthetic source, or on `shards`)."""
    data = ["--dataset=shards", f"--data_kwargs={json.dumps({'urls': shards})}"] if shards else [
        f"--data_kwargs={json.dumps({'n_train': n_train or args.batch_size * 8})}"]
    cmd = [sys.executable, "-m", "pdclip.train", f"--method={method}", f"--model={args.model}",
           f"--steps={args.steps}", f"--batch_size={args.batch_size}", f"--precision={args.precision}",
           f"--num_workers={args.workers}", *data,
           "--snapshot_every=0", "--save_every=0", "--progress=false", "--warmup_steps=2",
           f"--out={out / method}", "--overwrite"]
    subprocess.run(cmd, check=True, capture_output=True, env=thread_env(args.threads))
    lines = (out / method / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["samples_per_s"] for line in lines]


def open_clip_rates(args, out: Path, shards: str | None = None) -> list[float]:
    """Per-step samples/s parsed from open_clip_train's log (`log-every-n-steps 1`), on its synthetic
    data (one blank image) or on `shards` (its webdataset reader)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = ["--dataset-type", "webdataset", "--train-data", shards] if shards else ["--dataset-type", "synthetic"]
    argv = [*data, "--model", args.model, "--batch-size", str(args.batch_size),
            "--train-num-samples", str(args.batch_size * args.steps), "--epochs", "1", "--lr", "1e-3",
            "--wd", "0.1", "--warmup", "2", "--workers", str(args.workers), "--device", device,
            "--precision", OPEN_CLIP_PRECISION[args.precision], "--log-every-n-steps", "1",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--logs", str(out), "--name", "open_clip"]
    proc = subprocess.run([sys.executable, "-c", RUN_OPEN_CLIP, str(CONFIG_DIR), *argv],
                          capture_output=True, text=True, env=thread_env(args.threads))
    if proc.returncode:
        raise RuntimeError(f"open_clip_train failed:\n{proc.stderr[-2000:]}")
    return [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", proc.stdout + proc.stderr)]


# What `loop_vs_open_clip` feeds the two loops.
DATA = {
    "rendered": "each its own synthetic data, pdclip rendering every image (its first epoch)",
    "cached": "each its own synthetic data, pdclip's images rendered in an earlier epoch (its pixel cache)",
    "shards": "the same PNG webdataset shards",
}


def loop_vs_open_clip(args, data: str) -> tuple[float, float]:
    """Median samples/s of pdclip.train and open_clip_train (CLIP), the subprocesses alternated.

    Args:
        data: a key of `DATA`. On their own synthetic data pdclip renders scenes and open_clip
            transforms one blank image: "rendered" gives pdclip one pair per sample of the run, so every
            image is drawn for the first time; "cached" gives it 4 batches of pairs, so every step after
            the warm-up reads images rendered before (the case of any run longer than an epoch). On
            "shards" both read the same PNG shards, written here: the data cost is equal and the ratio
            measures the loops.
    """
    ours, theirs = [], []
    n_train = {"rendered": args.batch_size * (args.steps + 1), "cached": args.batch_size * max(1, min(4, args.warmup))}
    with tempfile.TemporaryDirectory() as tmp:
        shards = None
        if data == "shards":
            source = build_dataset("synthetic", "val", image_size=64, n_eval=args.batch_size * (args.steps + 1))
            n = len(write_shards(source, Path(tmp, "shards"), samples_per_shard=args.batch_size * 4))
            shards = f"{tmp}/shards/shard-{{00000..{n - 1:05d}}}.tar"
        for r in range(args.rounds):
            ours.append(median_after_warmup(pdclip_rates(args, "clip", Path(tmp), shards, n_train.get(data)), args.warmup))
            theirs.append(median_after_warmup(open_clip_rates(args, Path(tmp, f"open_clip{r}"), shards), args.warmup))
    return statistics.median(ours), statistics.median(theirs)


def step_times(base: TrainConfig, repeats: int, variants: tuple[str, ...] = tuple(VARIANTS),
               n_batches: int = 4) -> dict[str, float]:
    """Median seconds of one `Trainer.train_step` per variant (`loss_overhead.VARIANTS`), interleaved.

    Every variant trains its own model from the same seed on the same `n_batches` batches, drawn
    once beforehand: the times are the steps alone, without data loading. All the trainers live at
    once (a large model: pass fewer `variants`); "clip" is always one of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(replace(base, loss=VARIANTS[name], out=str(Path(tmp, name))))
                    for name in dict.fromkeys(("clip", *variants))}
        batches = list(itertools.islice(trainers["clip"].batches, n_batches))
        feeds = {name: itertools.cycle(batches) for name in trainers}
        return interleaved_medians({name: lambda name=name: trainers[name].train_step(next(feeds[name]))
                                    for name in trainers}, repeats, trainers["clip"].device.type)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="RN50" if cuda else "pdclip-vit-tiny")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 64)
    p.add_argument("--steps", type=int, default=40 if cuda else 20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument("--rounds", type=int, default=2, help="pdclip / open_clip subprocess pairs")
    p.add_argument("--repeats", type=int, default=15, help="interleaved steps per method")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="methods to step next to CLIP (each holds a model, its optimiser and teacher in memory)")
    p.add_argument("--workers", type=int, default=8 if cuda else 0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op CPU threads, everywhere")
    p.add_argument("--precision", default="bf16" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "fp16" if cuda else "fp32",
                   choices=sorted(OPEN_CLIP_PRECISION))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(f"model {args.model}, batch {args.batch_size}, {args.precision}, {args.workers} workers, {device}")
    print("\n1. CLIP training, samples/s (median per step, data loading included)")
    for data, what in DATA.items():
        ours, theirs = loop_vs_open_clip(args, data)
        print(f"   {what}: pdclip.train {ours:.1f}, open_clip_train {theirs:.1f}, ratio {ours / theirs:.2f}")
    base = TrainConfig(model=args.model, batch_size=args.batch_size, precision=args.precision, steps=10_000,
                       warmup_steps=2, snapshot_every=0, save_every=0, progress=False,
                       data_kwargs={"n_train": args.batch_size * 8})
    times = step_times(base, args.repeats, tuple(args.variants))
    print("\n2. Step time per method, pdclip's Trainer, interleaved in this process")
    for name, t in times.items():
        print(f"   {name:10s} {1000 * t:8.1f} ms/step   x{t / times['clip']:.2f} of CLIP")


if __name__ == "__main__":
    main()
